//! ferry's bundled stateful workload: resident memory with a known mix of
//! zero, repeated, text and random pages, and a counter that it reports.
//! See `ferry_lab::workload` for the layout and the report format.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_lab::workload::{self, fill_page, Mix, PageClass, PageCounts, Report};
use ferry_sys::PAGE_SIZE;
use memmap2::MmapMut;
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ferry-workload",
    version,
    about = "ferry's bundled stateful test workload"
)]
struct Args {
    /// Resident memory to hold, in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Percent of pages that are all zero bytes.
    #[arg(long, default_value_t = 25)]
    zero_pct: u8,
    /// Percent of pages that repeat one of 16 templates.
    #[arg(long, default_value_t = 25)]
    repeat_pct: u8,
    /// Percent of pages of compressible random text (random pages take the rest).
    #[arg(long, default_value_t = 25)]
    text_pct: u8,
    /// Where the zero pages lie: `scattered` (--zero-pct of them, at
    /// random), `every-N` (every N-th page) or `one-run` (--zero-pct of the
    /// pages in one run, in the middle).
    #[arg(long, default_value = "scattered")]
    zero_layout: ferry_lab::workload::ZeroLayout,
    /// Seed of the page contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// File to keep the report in (rewritten in place every tick).
    #[arg(long)]
    report: Option<PathBuf>,
    /// UDP address to send a heartbeat datagram to every tick.
    #[arg(long)]
    heartbeat: Option<SocketAddr>,
    /// Tick period in milliseconds.
    #[arg(long, default_value_t = 1)]
    tick_ms: u64,
    /// Random pages rewritten per second, in MiB/s (a dirty rate for pre-copy).
    #[arg(long, default_value_t = 0.0)]
    dirty_mib_s: f64,
    /// Open a TCP connection to this address at start and hold it (to test
    /// checkpoints of established connections).
    #[arg(long)]
    hold_tcp: Option<SocketAddr>,
    /// Connect to this unix socket at start and hold the connection.
    #[arg(long)]
    hold_unix: Option<PathBuf>,
    /// Serve a request counter over TCP on this address: each connection
    /// gets one line, `served=N ticks=T`, and N grows by one per request.
    /// The count lives in memory only, so a restore shows what was saved.
    #[arg(long)]
    serve: Option<SocketAddr>,
    /// Child processes to start (each a small idle process), to make a tree.
    #[arg(long, default_value_t = 0)]
    children: u32,
    /// Fork a twin once the memory is filled. It shares the memory
    /// copy-on-write; then the first process zeroes every run of 8 pages
    /// whose index (page index / 8) is 1 modulo 7 and the twin every run
    /// 2 modulo 7, so that each holds
    /// zero pages where the other does not (to test restores of inherited
    /// memory). The twin reports to `<report>.twin`, is the first of the
    /// report's children, and ends when its parent does.
    #[arg(long)]
    twin: bool,
    /// Stay in the caller's session instead of starting a new one.
    #[arg(long)]
    no_setsid: bool,
    /// Run as a child of another workload process (internal).
    #[arg(long, hide = true)]
    child: bool,
}

/// The twin and its parent each zero one run of pages in this many.
const TWIN_SHARE: usize = 7;
/// Pages in a run the twin or its parent zeroes: long enough that a
/// restore leaves the run out (see `ferry_archive::MIN_INNER_RUN`).
const TWIN_RUN: usize = 8;
/// Memory a child process holds, in pages.
const CHILD_PAGES: usize = 64;
/// How often a child checks whether its parent is gone.
const CHILD_POLL: Duration = Duration::from_millis(50);

fn main() -> Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let verify = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&verify))?;
    if args.child {
        return run_child(&args, &stop);
    }
    let mix = Mix {
        zero_pct: args.zero_pct,
        repeat_pct: args.repeat_pct,
        text_pct: args.text_pct,
        zeros: args.zero_layout,
    };
    if let Err(e) = mix.validate() {
        bail!("bad page mix: {e}");
    }
    if args.size_mib == 0 {
        bail!("--size-mib must be at least 1");
    }
    if args.tick_ms == 0 {
        bail!("--tick-ms must be at least 1");
    }
    if !args.no_setsid && nix::unistd::getsid(None)? != nix::unistd::getpid() {
        // A container's init may already lead its process group; then it
        // keeps the session it was given.
        if let Err(e) = nix::unistd::setsid() {
            eprintln!("ferry-workload: setsid: {e}; staying in the current session");
        }
    }
    run(&args, mix, &stop, &verify)
}

struct Memory {
    map: MmapMut,
    hashes: Vec<u64>,
    random_pages: Vec<usize>,
    counts: PageCounts,
}

impl Memory {
    fn fill(size_mib: u64, mix: Mix, seed: u64) -> Result<Memory> {
        let pages = workload::pages_in_mib(size_mib);
        let mut map = MmapMut::map_anon(pages * PAGE_SIZE).context("mmap workload memory")?;
        let mut hashes = Vec::with_capacity(pages);
        let mut random_pages = Vec::new();
        let mut counts = PageCounts::default();
        for (i, page) in map.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let class = mix.class_at(seed, i, pages);
            fill_page(page, class, seed, i as u64);
            hashes.push(xxh3_64(page));
            counts.add(class);
            if class == PageClass::Random {
                random_pages.push(i);
            }
        }
        Ok(Memory {
            map,
            hashes,
            random_pages,
            counts,
        })
    }

    fn verify(&self) -> bool {
        self.map
            .chunks_exact(PAGE_SIZE)
            .zip(&self.hashes)
            .all(|(page, h)| xxh3_64(page) == *h)
    }

    /// Zeroes every run of [`TWIN_RUN`] pages whose index is `k` modulo
    /// [`TWIN_SHARE`].
    fn zero_share(&mut self, k: usize, mix: Mix, seed: u64) {
        let pages = self.hashes.len();
        let in_share = |i: usize| (i / TWIN_RUN) % TWIN_SHARE == k;
        for i in (0..pages).filter(|&i| in_share(i)) {
            let page = &mut self.map[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            page.fill(0);
            self.hashes[i] = xxh3_64(page);
            let c = &mut self.counts;
            match mix.class_at(seed, i, pages) {
                PageClass::Zero => continue,
                PageClass::Repeat => c.repeat -= 1,
                PageClass::Text => c.text -= 1,
                PageClass::Random => c.random -= 1,
            }
            c.zero += 1;
        }
        self.random_pages.retain(|&i| !in_share(i));
    }

    fn dirty(&mut self, pages: u64, seed: u64, nonce: &mut u64, rng: &mut fastrand::Rng) {
        if self.random_pages.is_empty() {
            return;
        }
        for _ in 0..pages {
            let idx = self.random_pages[rng.usize(..self.random_pages.len())];
            *nonce += 1;
            let page = &mut self.map[idx * PAGE_SIZE..(idx + 1) * PAGE_SIZE];
            fill_page(page, PageClass::Random, seed, *nonce);
            self.hashes[idx] = xxh3_64(page);
        }
    }
}

fn run(args: &Args, mix: Mix, stop: &AtomicBool, verify: &AtomicBool) -> Result<()> {
    let mut memory = Memory::fill(args.size_mib, mix, args.seed)?;
    // Forked before any thread starts.
    let (mut twin, mut parent) = (None, None);
    let twin_args;
    let args = match args.twin {
        false => args,
        true => match ferry_sys::spawn::fork_single_threaded().context("fork the twin")? {
            Some(pid) => {
                memory.zero_share(1, mix, args.seed);
                twin = Some(nix::unistd::Pid::from_raw(pid));
                args
            }
            None => {
                memory.zero_share(2, mix, args.seed);
                parent = Some(nix::unistd::getppid());
                let mut report = args.report.clone().map(|r| r.into_os_string());
                if let Some(r) = &mut report {
                    r.push(".twin");
                }
                twin_args = Args {
                    report: report.map(PathBuf::from),
                    heartbeat: None,
                    hold_tcp: None,
                    hold_unix: None,
                    serve: None,
                    children: 0,
                    twin: false,
                    ..args.clone()
                };
                &twin_args
            }
        },
    };
    let report_file = match &args.report {
        Some(path) => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("open report file {}", path.display()))?;
            f.set_len(workload::REPORT_BYTES as u64)?;
            Some(f)
        }
        None => None,
    };
    let heartbeat = match args.heartbeat {
        Some(addr) => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            Some((UdpSocket::bind(bind)?, addr))
        }
        None => None,
    };
    let _held_tcp = args
        .hold_tcp
        .map(std::net::TcpStream::connect)
        .transpose()
        .context("connect --hold-tcp")?;
    let _held_unix = args
        .hold_unix
        .as_ref()
        .map(std::os::unix::net::UnixStream::connect)
        .transpose()
        .context("connect --hold-unix")?;
    let ticks = Arc::new(AtomicU64::new(0));
    if let Some(addr) = args.serve {
        let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
        let ticks = Arc::clone(&ticks);
        thread::spawn(move || serve(listener, &ticks));
    }
    let mut children = spawn_children(args.children)?;
    let mut report = Report {
        pid: std::process::id(),
        counter: 0,
        size_mib: args.size_mib,
        pages: memory.counts,
        repeat_distinct: memory.counts.repeat.min(workload::REPEAT_TEMPLATES as u64),
        verify_seq: 0,
        mem_ok: true,
        dirtied_pages: 0,
        children: twin
            .map(|p| p.as_raw() as u32)
            .into_iter()
            .chain(children.iter().map(Child::id))
            .collect(),
    };
    let tick = Duration::from_millis(args.tick_ms);
    let dirty_pages_per_tick =
        args.dirty_mib_s * (1 << 20) as f64 / PAGE_SIZE as f64 * tick.as_secs_f64();
    let mut dirty_debt = 0.0f64;
    let mut nonce = memory.hashes.len() as u64;
    let mut rng = fastrand::Rng::with_seed(args.seed ^ 0xD1D1);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if parent.is_some_and(|p| nix::unistd::getppid() != p) {
            break; // a twin whose parent is gone
        }
        next += tick;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else if now - next > tick {
            // Frozen or restored: the schedule restarts from now.
            next = now;
        }
        report.counter += 1;
        ticks.store(report.counter, Ordering::Relaxed);
        dirty_debt += dirty_pages_per_tick;
        if dirty_debt >= 1.0 {
            let n = dirty_debt as u64;
            dirty_debt -= n as f64;
            memory.dirty(n, args.seed, &mut nonce, &mut rng);
            report.dirtied_pages += n;
        }
        if verify.swap(false, Ordering::Relaxed) {
            report.mem_ok = memory.verify();
            report.verify_seq += 1;
        }
        if let Some(f) = &report_file {
            write_report(f, &report)?;
        }
        if let Some((sock, addr)) = &heartbeat {
            // A lost heartbeat is what the prober measures; never fatal.
            let _ = sock.send_to(&workload::heartbeat(report.pid, report.counter), addr);
        }
    }
    if let Some(t) = twin {
        let _ = nix::sys::signal::kill(t, nix::sys::signal::Signal::SIGTERM);
        let _ = nix::sys::wait::waitpid(t, None);
    }
    for c in &mut children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
    Ok(())
}

/// The counter service: one line per connection, then close.
fn serve(listener: TcpListener, ticks: &AtomicU64) {
    let mut served = 0u64;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        served += 1;
        let line = format!("served={served} ticks={}\n", ticks.load(Ordering::Relaxed));
        // A client that went away costs nothing but its request.
        let _ = stream.write_all(line.as_bytes());
    }
}

fn write_report(f: &File, report: &Report) -> Result<()> {
    f.write_all_at(&report.to_record()?, 0)?;
    Ok(())
}

fn spawn_children(n: u32) -> Result<Vec<Child>> {
    let exe = std::env::current_exe()?;
    (0..n)
        .map(|_| {
            Command::new(&exe)
                .arg("--child")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn workload child")
        })
        .collect()
}

fn run_child(args: &Args, stop: &AtomicBool) -> Result<()> {
    let parent = nix::unistd::getppid();
    let mut map = MmapMut::map_anon(CHILD_PAGES * PAGE_SIZE)?;
    for (i, page) in map.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, PageClass::Text, args.seed, i as u64);
    }
    while !stop.load(Ordering::Relaxed) && nix::unistd::getppid() == parent {
        thread::sleep(CHILD_POLL);
    }
    drop(map);
    Ok(())
}
