//! Fuzzes a real agent with sequences of session messages from a peer that
//! holds the key (the most an authenticated source can do): begins, joins,
//! digest queries, layouts, image lists and their blobs, rebuilds,
//! restores, commits, page batches (well formed or not, compressed or
//! not), page-source connections, HA offers' replies, in any order, over
//! a control and a data connection. The agent runs in this process (its
//! CRIU is `/bin/false`, its runc root and Docker socket point nowhere),
//! so libFuzzer's RSS limit bounds what any sequence makes it hold. It
//! must answer with errors, never panic, hang or grow without bound.

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use ferry_agent::AgentConfig;
use ferry_transport::msg::{ArchiveFile, ImageEntry, RestoreOpts, Target};
use ferry_transport::{pages, Conn, Msg, Secret};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = 4096;

struct Agent {
    addr: String,
    secret: Secret,
}

/// One agent for the whole run, in a directory of its own.
fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let dir: PathBuf = tempfile::tempdir().unwrap().keep();
        let key = dir.join("key");
        Secret::generate(&key).unwrap();
        let secret = Secret::from_file(&key).unwrap();
        let config = AgentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            key,
            store: dir.join("store"),
            criu: Some("/bin/false".into()),
            criu_service: None,
            runc_root: dir.join("runc"),
            docker_socket: dir.join("no-docker.sock"),
            staging: Some(dir.join("staging")),
            keep_images: false,
            ha: None,
            metrics: None,
            store_max: None,
        };
        std::fs::create_dir_all(dir.join("staging")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        std::thread::spawn(move || {
            let _ = ferry_agent::run(config, &mut |ready| {
                let _ = tx.send(ready.listen);
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Agent {
            addr: addr.to_string(),
            secret,
        }
    })
}

/// Takes bytes from the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let b: Vec<u8> = (0..8).map(|_| self.u8()).collect();
        u64::from_le_bytes(b.try_into().unwrap())
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.u16()).min(max).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    /// A number that is often small, sometimes huge.
    fn count(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => self.u64(),
            _ => u64::from(self.u16() % 600),
        }
    }
    fn name(&mut self) -> String {
        const NAMES: [&str; 10] = [
            "pages-1.img",
            "pagemap-1.img",
            "core-1.img",
            "mm-1.img",
            "pstree.img",
            "inventory.img",
            "../escape.img",
            "/etc/passwd",
            "",
            "pages-99999999999999999999.img",
        ];
        NAMES[usize::from(self.u8()) % NAMES.len()].to_string()
    }
}

fn batch(input: &mut Input, secret: &Secret) -> Vec<u8> {
    match input.u8() % 3 {
        // A well-formed batch: pages and their digests under the key.
        0 => {
            let n = usize::from(input.u8() % 8);
            let key = secret.page_key();
            let data: Vec<u8> = (0..n * PAGE)
                .map(|i| (i / PAGE) as u8 ^ input.u8())
                .collect();
            let digests: Vec<u128> = data.chunks(PAGE).map(|p| key.digest(p)).collect();
            pages::encode_batch(&digests, &data)
        }
        // A header claiming more pages than follow.
        1 => {
            let mut b = input.u64().to_le_bytes()[..4].to_vec();
            b.extend(input.bytes(1 << 16));
            b
        }
        _ => input.bytes(1 << 16),
    }
}

fn run_sequence(data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let agent = agent();
    let session = format!("fuzz-{}", N.fetch_add(1, Ordering::Relaxed));
    let mut input = Input(data);
    let connect = || Conn::connect(&agent.addr, &agent.secret, Duration::from_secs(5)).ok();
    let mut conns: Vec<Conn> = Vec::new();
    let mut at = 0usize;
    let mut steps = 0;
    while !input.done() && steps < 64 {
        steps += 1;
        if conns.is_empty() || input.u8() % 8 == 0 {
            if conns.len() >= 3 {
                at = usize::from(input.u8()) % conns.len();
            } else {
                match connect() {
                    Some(c) => conns.push(c),
                    None => return,
                }
                at = conns.len() - 1;
            }
        }
        let conn = &mut conns[at];
        let sent = match input.u8() % 19 {
            0 => conn.send_msg(&Msg::Begin {
                session: session.clone(),
                target: match input.u8() % 4 {
                    0 => Target::Runc {
                        id: input.name(),
                        bundle: None,
                    },
                    1 => Target::Docker { name: input.name() },
                    _ => Target::Process {
                        pid: input.u16() as i32,
                    },
                },
                expected_bytes: input.count(),
                boot_id: String::new(),
                host: "fuzz".into(),
                gpu: None,
                kernel_proof: None,
            }),
            1 => conn.send_msg(&Msg::Join {
                session: session.clone(),
            }),
            2 => {
                let count = input.count();
                conn.send_msg(&Msg::Query { count })
                    .and_then(|()| conn.send_blob(&input.bytes(1 << 16)))
            }
            3 => conn.send_msg(&Msg::Flush),
            4 => {
                let (pid, count) = (input.u16() as i32, input.count());
                conn.send_msg(&Msg::Layout { pid, count })
                    .and_then(|()| conn.send_blob(&input.bytes(1 << 16)))
            }
            5 => {
                let n = input.u8() % 4;
                let files: Vec<ImageEntry> = (0..n)
                    .map(|_| ImageEntry {
                        name: input.name(),
                        size: input.count(),
                        checksum: format!("{:032x}", input.u64()),
                        recipe: input.u8() % 2 == 0,
                    })
                    .collect();
                let mut r = conn.send_msg(&Msg::Images { files });
                for _ in 0..n {
                    r = r.and_then(|()| conn.send_blob(&input.bytes(1 << 16)));
                }
                r
            }
            6 => conn.send_msg(&Msg::Rebuild),
            7 => conn.send_msg(&Msg::Restore {
                opts: RestoreOpts {
                    lazy_pages: input.u8() % 2 == 0,
                    remote_pages: input.u8() % 2 == 0,
                    ..RestoreOpts::default()
                },
            }),
            8 => conn.send_msg(&Msg::Commit),
            9 => {
                let b = batch(&mut input, &agent.secret);
                conn.send_pages(&b, input.u8() % 2 == 0)
            }
            10 => conn.send_blob(&input.bytes(1 << 16)),
            11 => conn.send_msg(&Msg::PageSource {
                session: session.clone(),
            }),
            12 => conn.send_msg(&Msg::Have {
                ids: vec![format!("{:x}", input.u64())],
            }),
            13 => {
                let n = input.u8() % 3;
                let files = (0..n)
                    .map(|g| ArchiveFile {
                        generation: u64::from(g),
                        size: input.count(),
                        id: format!("{:x}", input.u64()),
                    })
                    .collect();
                conn.send_msg(&Msg::Archives {
                    keep: usize::from(input.u8()),
                    files,
                })
            }
            14 => conn
                .send_msg(&Msg::PageData {
                    zero: (0..input.u8() % 8).map(u32::from).collect(),
                    repeat: vec![(u32::from(input.u8()), input.count())],
                    stored: (0..input.u8() % 4).map(u32::from).collect(),
                })
                .and_then(|()| conn.send_blob(&input.bytes(1 << 16)))
                .and_then(|()| conn.send_blob(&input.bytes(64))),
            15 => conn.send_msg(&Msg::PageMap {
                session: session.clone(),
            }),
            16 => conn.send_msg(&Msg::MapEnd),
            17 => conn.send_msg(&Msg::MapInstalled),
            _ => conn.send_msg(&Msg::PagesDone {
                requests: input.count(),
                pages: input.count(),
                ms: 1.0,
            }),
        };
        if sent.is_err() {
            conns.remove(at);
            at = 0;
        }
    }
    // Whatever the agent answered, read without waiting long.
    for conn in &mut conns {
        let _ = conn.set_read_timeout(Some(Duration::from_millis(2)));
        while conn.recv().is_ok_and(|m| m.is_some()) {}
        conn.shutdown();
    }
}

fuzz_target!(|data: &[u8]| {
    run_sequence(data);
});
