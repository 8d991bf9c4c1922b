#!/usr/bin/env bash
# Run CRIU zdtm static tests (host flavour) one at a time against a criu binary
# and print a results table.
#
#   scripts/zdtm/run.sh [options] TESTS_FILE
#
#   TESTS_FILE     one test a line: "env00" or "zdtm/static/env00"; '#' comments
#   --tree DIR     criu source tree from fetch-and-build.sh
#                  (default: newest /var/tmp/ferry-zdtm/criu-*)
#   --criu-bin P   criu (or criu-compatible) binary zdtm runs (default /usr/local/bin/criu)
#   --timeout S    wall-clock bound per test (default 120)
#   --keep-root    don't let tests switch to zdtm's uid/gid (FERRY_ZDTM_KEEP_ROOT=1,
#                  see fetch-and-build.sh); needed where root lacks CAP_SYS_RESOURCE
#   --log-calls F  log every criu command line zdtm issues to F (tab separated:
#                  time, cwd, argv), through a wrapper around --criu-bin
#   --out DIR      per-test zdtm output (default: a new /tmp/ferry-zdtm-run.XXXXXX)
#   --             anything after this is passed to `zdtm.py run` as is
#
# Output (stdout): "test<TAB>result<TAB>seconds<TAB>detail", result one of
# pass, fail, skip, timeout; then a summary line. Exit status 0 only if nothing
# failed or timed out.
set -uo pipefail

tree= criu_bin=/usr/local/bin/criu tmo=120 keep_root=0 log_calls= out= extra=()
while (($#)); do
  case $1 in
    --tree) tree=$2; shift 2 ;;
    --criu-bin) criu_bin=$2; shift 2 ;;
    --timeout) tmo=$2; shift 2 ;;
    --keep-root) keep_root=1; shift ;;
    --log-calls) log_calls=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) list=$1; shift ;;
  esac
done
[ -n "${list:-}" ] && [ -r "$list" ] || { echo "usage: run.sh [options] TESTS_FILE (see --help)" >&2; exit 2; }
[ -n "$tree" ] || tree=$(ls -d /var/tmp/ferry-zdtm/criu-* 2>/dev/null | sort -V | tail -1)
[ -f "$tree/test/zdtm.py" ] || { echo "run.sh: no zdtm tree (run fetch-and-build.sh first): '$tree'" >&2; exit 2; }
criu_bin=$(readlink -f "$(command -v "$criu_bin" || echo "$criu_bin")")
[ -x "$criu_bin" ] || { echo "run.sh: criu binary not executable: $criu_bin" >&2; exit 2; }
[ -n "$out" ] || out=$(mktemp -d /tmp/ferry-zdtm-run.XXXXXX)
mkdir -p "$out"; out=$(cd "$out" && pwd)
list=$(readlink -f "$list")

bin=$criu_bin
if [ -n "$log_calls" ]; then
  touch "$log_calls"; log_calls=$(readlink -f "$log_calls")
  bin=$out/criu-logwrap.sh
  cat > "$bin" <<EOF
#!/bin/bash
{ printf '%s\t%s\t' "\$(date +%s.%N)" "\$PWD"; printf '%q ' criu "\$@"; echo; } >> '$log_calls'
exec '$criu_bin' "\$@"
EOF
  chmod 755 "$bin"
fi

# zdtm.py re-executes itself through its shebang (#!/usr/bin/env python3) inside
# zdtm_ct; make that the system python, which has python3-yaml/-protobuf.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin
export ZDTM_IGNORE_TAINT=1
((keep_root)) && export FERRY_ZDTM_KEEP_ROOT=1 || unset FERRY_ZDTM_KEEP_ROOT

cd "$tree/test" || exit 2
npass=0 nfail=0 nskip=0 ntmo=0
printf 'test\tresult\tseconds\tdetail\n'
while read -r t _; do
  t=${t%%#*}; [ -n "$t" ] || continue
  case $t in zdtm/*) ;; *) t=zdtm/static/$t ;; esac
  name=${t##*/}
  logf=$out/$name.log
  if [ ! -x "$t" ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" skip 0 "no test binary $t"; nskip=$((nskip + 1)); continue
  fi
  start=$(date +%s.%N)
  timeout -k 10 "$tmo" /usr/bin/python3 zdtm.py run -t "$t" -f h --criu-bin "$bin" \
      --ignore-taint "${extra[@]}" >"$logf" 2>&1 </dev/null
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  detail=
  if ((rc == 124 || rc == 137)); then
    res=timeout; detail="over ${tmo}s"; ntmo=$((ntmo + 1))
  elif grep -q "^Skipping " "$logf"; then
    res=skip; detail=$(sed -n 's/^Skipping [^ ]* (\(.*\))$/\1/p' "$logf" | head -1); nskip=$((nskip + 1))
  elif ((rc == 0)) && grep -q "Test $t PASS" "$logf"; then
    res=pass; npass=$((npass + 1))
  else
    res=fail; nfail=$((nfail + 1))
    detail=$(grep -o "FAIL at [^#]*" "$logf" | head -1 | sed 's/ *$//')
    err=$(grep -o 'Error ([^)]*): .*' "$logf" | grep -v "Can't setup RLIMIT_NOFILE for self" | head -1 | sed "s/['\"]\$//")
    [ -n "$detail" ] || detail="rc=$rc: $(grep -v '^\s*$' "$logf" | tail -1)"
    [ -n "$err" ] && detail="$detail; $err"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$res" "$secs" "$detail"
  # zdtm leaves the images of failed runs under test/dump/; keep them with the log
  if [ "$res" != pass ] && [ -d "dump/$t" ]; then
    mkdir -p "$out/dump"; rm -rf "${out:?}/dump/$name"; mv "dump/$t" "$out/dump/$name" 2>/dev/null || true
  fi
done <"$list"
echo "# pass $npass, fail $nfail, timeout $ntmo, skip $nskip; criu: $criu_bin; keep-root: $keep_root; logs: $out"
((nfail == 0 && ntmo == 0))
