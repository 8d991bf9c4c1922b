//! An authenticated connection: the handshake, then sequenced, tagged frames.

use std::io::{BufReader, BufWriter, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::frame::{self, Frame, FrameFault, FrameKind, FLAG_ZSTD, PUBLIC_KEY};
use super::msg::Msg;
use super::TransportError;

/// Shortest secret accepted, in bytes (128 bits).
pub(crate) const MIN_SECRET_BYTES: usize = 16;
/// zstd level for compressed payloads: level 1 keeps up with a 10 Gbit/s
/// link on one core (see `ferry bench compress`).
const PAYLOAD_ZSTD_LEVEL: i32 = 1;
/// Payloads smaller than this are sent as they are.
const COMPRESS_MIN_BYTES: usize = 512;

const NONCE_LEN: usize = 32;

/// The shared secret, turned into a key.
#[derive(Clone)]
pub struct Secret {
    key: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads a key file: any bytes, at least [`MIN_SECRET_BYTES`] of them
    /// once surrounding whitespace is trimmed (a hex or base64 line works).
    /// Reads the secret in `path`, refused (as ssh refuses a private key)
    /// when the file belongs to another user or other users may read it.
    pub fn from_file(path: &Path) -> Result<Secret, TransportError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let err = |source| TransportError::SecretFile {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(TransportError::SecretOwner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(TransportError::SecretExposed {
                path: path.to_path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(TransportError::SecretTooShort {
                path: path.to_path_buf(),
                len: trimmed.len(),
                min: MIN_SECRET_BYTES,
            });
        }
        Ok(Secret::from_bytes(trimmed))
    }

    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret {
            key: blake3::derive_key("ferry transport v1 shared secret", bytes),
        }
    }

    /// Writes a new random secret (64 hex digits) to `path`, mode 0600.
    pub fn generate(path: &Path) -> Result<(), TransportError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| TransportError::SecretFile {
            path: path.to_path_buf(),
            source,
        };
        let random = random_bytes::<32>().map_err(err)?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        writeln!(f, "{hex}").map_err(err)
    }

    fn derive(&self, context: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(context.as_bytes());
        for p in parts {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }
}

fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the connection (the migrating source).
    Client,
    /// Accepted it (the agent).
    Server,
}

/// What arrived on a connection.
#[derive(Debug)]
pub enum Incoming {
    Msg(Msg),
    /// A batch of pages, decompressed (see [`super::pages`]).
    Pages(Vec<u8>),
    /// Bytes that follow a message (a file, a recipe, a digest list).
    Blob(Vec<u8>),
}

/// An authenticated connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    peer: String,
    send_key: [u8; 32],
    recv_key: [u8; 32],
    send_seq: u64,
    recv_seq: u64,
    sent_bytes: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.peer)
    }
}

/// Socket buffers sized for a fast link's bandwidth-delay product.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

impl Conn {
    /// Connects to `addr` and authenticates (as the client).
    pub fn connect(addr: &str, secret: &Secret, timeout: Duration) -> Result<Conn, TransportError> {
        let connect_err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| connect_err(std::io::ErrorKind::AddrNotAvailable.into()))?;
        let stream = TcpStream::connect_timeout(&sockaddr, timeout).map_err(connect_err)?;
        Conn::handshake(stream, addr.to_string(), secret, Role::Client, timeout)
    }

    /// Authenticates an accepted connection (as the server). Nothing but
    /// the handshake is read before the peer has proven it holds the key.
    pub fn accept(
        stream: TcpStream,
        secret: &Secret,
        timeout: Duration,
    ) -> Result<Conn, TransportError> {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "peer".into());
        Conn::handshake(stream, peer, secret, Role::Server, timeout)
    }

    fn handshake(
        stream: TcpStream,
        peer: String,
        secret: &Secret,
        role: Role,
        timeout: Duration,
    ) -> Result<Conn, TransportError> {
        let io = |peer: &str| {
            let peer = peer.to_string();
            move |source| TransportError::Io { peer, source }
        };
        stream.set_nodelay(true).map_err(io(&peer))?;
        stream.set_read_timeout(Some(timeout)).map_err(io(&peer))?;
        stream.set_write_timeout(Some(timeout)).map_err(io(&peer))?;
        ferry_sys::set_socket_buffers(&stream, SOCKET_BUFFER_BYTES);
        let writer_stream = stream.try_clone().map_err(io(&peer))?;
        let hs_key = secret.derive("handshake", &[]);
        let mut conn = Conn {
            reader: BufReader::with_capacity(1 << 20, stream),
            writer: BufWriter::with_capacity(1 << 20, writer_stream),
            peer,
            send_key: hs_key,
            recv_key: hs_key,
            send_seq: 0,
            recv_seq: 0,
            sent_bytes: 0,
        };
        let mine = random_bytes::<NONCE_LEN>().map_err(io(&conn.peer))?;
        let (client_nonce, server_nonce) = match role {
            Role::Client => {
                conn.send(FrameKind::Hello, &mine, false)?;
                let f = conn.recv_frame_expect(FrameKind::Welcome, "Welcome")?;
                (mine.to_vec(), f.payload)
            }
            Role::Server => {
                let f = match conn.recv_frame_expect(FrameKind::Hello, "Hello") {
                    Ok(f) => f,
                    Err(e) => {
                        conn.refuse("authentication failed: wrong key or not a ferry peer");
                        return Err(e);
                    }
                };
                conn.send(FrameKind::Welcome, &mine, false)?;
                (f.payload, mine.to_vec())
            }
        };
        if client_nonce.len() != NONCE_LEN || server_nonce.len() != NONCE_LEN {
            return Err(TransportError::Auth {
                peer: conn.peer.clone(),
                why: "bad nonce length".into(),
            });
        }
        let c2s = secret.derive("client to server", &[&client_nonce, &server_nonce]);
        let s2c = secret.derive("server to client", &[&client_nonce, &server_nonce]);
        (conn.send_key, conn.recv_key) = match role {
            Role::Client => (c2s, s2c),
            Role::Server => (s2c, c2s),
        };
        // Each side proves it derived the session key: a replayed Hello or
        // Welcome cannot produce these tags.
        match role {
            Role::Client => {
                conn.send(FrameKind::Proof, b"client", false)?;
                conn.recv_frame_expect(FrameKind::Proof, "Proof")?;
            }
            Role::Server => {
                if let Err(e) = conn.recv_frame_expect(FrameKind::Proof, "Proof") {
                    conn.refuse("authentication failed: bad proof");
                    return Err(e);
                }
                conn.send(FrameKind::Proof, b"server", false)?;
            }
        }
        Ok(conn)
    }

    /// Tells the peer why it is refused (best effort) with a frame anyone
    /// can read.
    fn refuse(&mut self, why: &str) {
        let _ = frame::write_frame(
            &mut self.writer,
            &PUBLIC_KEY,
            FrameKind::Refused,
            0,
            0,
            why.as_bytes(),
        );
    }

    /// Bytes written to the socket so far (frames, after compression).
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Read timeout for what follows (`None`: wait for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|source| self.io_err(source))
    }

    /// A handle to the socket, for shutting the connection from another
    /// thread while one blocks on it.
    pub fn socket_handle(&self) -> std::io::Result<TcpStream> {
        self.reader.get_ref().try_clone()
    }

    /// Closes both directions (wakes a thread blocked reading).
    pub fn shutdown(&self) {
        let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
    }

    fn io_err(&self, source: std::io::Error) -> TransportError {
        TransportError::Io {
            peer: self.peer.clone(),
            source,
        }
    }

    fn send(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        compress: bool,
    ) -> Result<(), TransportError> {
        let (flags, body) = if compress && payload.len() >= COMPRESS_MIN_BYTES {
            match zstd::bulk::compress(payload, PAYLOAD_ZSTD_LEVEL) {
                Ok(c) if c.len() < payload.len() => (FLAG_ZSTD, std::borrow::Cow::Owned(c)),
                _ => (0, std::borrow::Cow::Borrowed(payload)),
            }
        } else {
            (0, std::borrow::Cow::Borrowed(payload))
        };
        let seq = self.send_seq;
        frame::write_frame(&mut self.writer, &self.send_key, kind, flags, seq, &body)
            .map_err(|source| self.io_err(source))?;
        self.send_seq += 1;
        self.sent_bytes += (frame::HEADER_LEN + body.len() + frame::TAG_LEN) as u64;
        Ok(())
    }

    /// Sends a control message.
    pub fn send_msg(&mut self, msg: &Msg) -> Result<(), TransportError> {
        let json = serde_json::to_vec(msg).map_err(|e| TransportError::BadFrame {
            peer: self.peer.clone(),
            what: format!("cannot encode message: {e}"),
        })?;
        self.send(FrameKind::Msg, &json, true)
    }

    /// Sends bytes that belong to the previous message, compressed.
    pub fn send_blob(&mut self, data: &[u8]) -> Result<(), TransportError> {
        self.send(FrameKind::Blob, data, true)
    }

    /// Sends an encoded page batch; `compress` when the pages may shrink.
    pub fn send_pages(&mut self, batch: &[u8], compress: bool) -> Result<(), TransportError> {
        self.send(FrameKind::Pages, batch, compress)
    }

    fn recv_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        let key = self.recv_key;
        let got = frame::read_frame_keyed(&mut self.reader, &|kind| {
            if kind == FrameKind::Refused {
                PUBLIC_KEY
            } else {
                key
            }
        });
        let frame = match got {
            Ok(None) => return Ok(None),
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(fault))) => return Err(self.fault(fault)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(TransportError::Closed {
                    peer: self.peer.clone(),
                })
            }
            Err(source) => return Err(self.io_err(source)),
        };
        if frame.kind == FrameKind::Refused {
            return Err(TransportError::Refused {
                peer: self.peer.clone(),
                why: String::from_utf8_lossy(&frame.payload).into_owned(),
            });
        }
        if frame.seq != self.recv_seq {
            return Err(TransportError::BadFrame {
                peer: self.peer.clone(),
                what: format!(
                    "frame out of sequence: got {}, expected {} (replayed or lost)",
                    frame.seq, self.recv_seq
                ),
            });
        }
        self.recv_seq += 1;
        let mut frame = frame;
        if frame.flags & FLAG_ZSTD != 0 {
            frame.payload = zstd::stream::decode_all(frame.payload.as_slice()).map_err(|e| {
                TransportError::BadFrame {
                    peer: self.peer.clone(),
                    what: format!("payload does not decompress: {e}"),
                }
            })?;
            if frame.payload.len() > frame::MAX_PAYLOAD {
                return Err(self.fault(FrameFault::TooLarge(frame.payload.len())));
            }
        }
        Ok(Some(frame))
    }

    fn fault(&self, fault: FrameFault) -> TransportError {
        if self.send_seq == 0 || matches!(fault, FrameFault::Tag) && self.recv_seq <= 1 {
            TransportError::Auth {
                peer: self.peer.clone(),
                why: fault.to_string(),
            }
        } else {
            TransportError::BadFrame {
                peer: self.peer.clone(),
                what: fault.to_string(),
            }
        }
    }

    fn recv_frame_expect(
        &mut self,
        kind: FrameKind,
        name: &'static str,
    ) -> Result<Frame, TransportError> {
        match self.recv_frame()? {
            Some(f) if f.kind == kind => Ok(f),
            Some(f) => Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                got: format!("{:?} frame", f.kind),
                expected: name,
            }),
            None => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    /// The next frame after the handshake; `None` at a clean close.
    pub fn recv(&mut self) -> Result<Option<Incoming>, TransportError> {
        let Some(f) = self.recv_frame()? else {
            return Ok(None);
        };
        Ok(Some(match f.kind {
            FrameKind::Msg => Incoming::Msg(serde_json::from_slice(&f.payload).map_err(|e| {
                TransportError::BadFrame {
                    peer: self.peer.clone(),
                    what: format!("undecodable message: {e}"),
                }
            })?),
            FrameKind::Pages => Incoming::Pages(f.payload),
            FrameKind::Blob => Incoming::Blob(f.payload),
            other => {
                return Err(TransportError::Unexpected {
                    peer: self.peer.clone(),
                    got: format!("{other:?} frame"),
                    expected: "a message, pages or a blob",
                })
            }
        }))
    }

    /// The next control message; anything else is an error. A message
    /// `Msg::Error` from the peer becomes [`TransportError::Remote`].
    pub fn recv_msg(&mut self) -> Result<Msg, TransportError> {
        match self.recv()? {
            Some(Incoming::Msg(Msg::Error { message })) => Err(TransportError::Remote {
                peer: self.peer.clone(),
                message,
            }),
            Some(Incoming::Msg(m)) => Ok(m),
            Some(other) => Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                got: kind_name(&other).into(),
                expected: "a message",
            }),
            None => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    /// The blob that follows a message.
    pub fn recv_blob(&mut self) -> Result<Vec<u8>, TransportError> {
        match self.recv()? {
            Some(Incoming::Blob(b)) => Ok(b),
            Some(Incoming::Msg(Msg::Error { message })) => Err(TransportError::Remote {
                peer: self.peer.clone(),
                message,
            }),
            Some(other) => Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                got: kind_name(&other).into(),
                expected: "a blob",
            }),
            None => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
        }
    }
}

fn kind_name(i: &Incoming) -> &'static str {
    match i {
        Incoming::Msg(_) => "message",
        Incoming::Pages(_) => "page batch",
        Incoming::Blob(_) => "blob",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        client_secret: &[u8],
        server_secret: &[u8],
    ) -> (Result<Conn, TransportError>, Result<Conn, TransportError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server_secret = Secret::from_bytes(server_secret);
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            Conn::accept(s, &server_secret, Duration::from_secs(5))
        });
        let client = Conn::connect(
            &addr,
            &Secret::from_bytes(client_secret),
            Duration::from_secs(5),
        );
        (client, server.join().unwrap())
    }

    #[test]
    fn peers_with_the_same_key_talk() {
        let (c, s) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.send_msg(&Msg::Flush).unwrap();
        c.send_blob(&vec![7u8; 10_000]).unwrap();
        assert!(matches!(s.recv_msg().unwrap(), Msg::Flush));
        assert_eq!(s.recv_blob().unwrap(), vec![7u8; 10_000]);
        s.send_msg(&Msg::Error {
            message: "no".into(),
        })
        .unwrap();
        assert!(matches!(c.recv_msg(), Err(TransportError::Remote { .. })));
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (c, s) = pair(b"0123456789abcdef", b"fedcba9876543210");
        let c = c.unwrap_err();
        let s = s.unwrap_err();
        assert!(matches!(s, TransportError::Auth { .. }), "{s}");
        assert!(
            matches!(
                c,
                TransportError::Refused { .. } | TransportError::Auth { .. }
            ),
            "{c}"
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "short\n").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert!(matches!(
            Secret::from_file(&p),
            Err(TransportError::SecretTooShort { len: 5, .. })
        ));
        let g = dir.path().join("gen");
        Secret::generate(&g).unwrap();
        Secret::from_file(&g).unwrap();
        assert!(Secret::generate(&g).is_err(), "never overwrites a key");
    }

    /// A key other users can read is refused, naming the chmod to run.
    #[test]
    fn a_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("gen");
        Secret::generate(&g).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&g, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Secret::from_file(&g).unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o400)).unwrap();
        Secret::from_file(&g).unwrap();
    }
}
