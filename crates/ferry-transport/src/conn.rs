//! An authenticated, encrypted connection: the Noise handshake, then
//! sequenced frames sealed by [`super::seal`].

use std::io::{BufReader, BufWriter, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use super::frame::{self, Frame, FrameFault, FrameKind, FLAG_ZSTD, PUBLIC_KEY};
use super::msg::Msg;
use super::seal;
use super::TransportError;

/// Shortest secret accepted, in bytes (128 bits).
pub(crate) const MIN_SECRET_BYTES: usize = 16;
/// zstd level for compressed payloads: level 1 keeps up with a 10 Gbit/s
/// link on one core (see `ferry bench compress`).
const PAYLOAD_ZSTD_LEVEL: i32 = 1;
/// Payloads smaller than this are sent as they are.
const COMPRESS_MIN_BYTES: usize = 512;

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
    /// Refused (as ssh refuses a private key) when the file belongs to
    /// another user or other users may read it.
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
        let random = ferry_sys::random_bytes::<32>().map_err(err)?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        writeln!(f, "{hex}").map_err(err)
    }

    /// A tag over `parts` (each length-prefixed, so no two lists of parts
    /// give the same input) under this secret, for records that travel
    /// outside the transport (e.g. the HA service specs kept in etcd):
    /// only a holder of the secret can make one.
    pub fn tag(&self, context: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"ferry record tag\0");
        h.update(context.as_bytes());
        h.update(b"\0");
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// Does `tag` match [`Secret::tag`] of these parts? (Compared in
    /// constant time.)
    pub fn verify_tag(&self, context: &str, parts: &[&[u8]], tag: &[u8; 32]) -> bool {
        blake3::Hash::from(self.tag(context, parts)) == blake3::Hash::from(*tag)
    }

    /// The key page digests are made with on both ends of a migration and
    /// in the agent's store: derived from this secret, so no checkpointed
    /// process knows it (see [`ferry_image::page::PageKey`]).
    pub fn page_key(&self) -> ferry_image::page::PageKey {
        ferry_image::page::PageKey::new(self.derive("ferry page identity v1", &[]))
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

/// A reader that gives up at a deadline: before each read the socket's
/// timeout is set to what is left.
struct Deadline<'a> {
    inner: &'a mut BufReader<TcpStream>,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.inner.get_ref().set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
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

/// An authenticated, encrypted connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    peer: String,
    /// The session's ciphers, once the handshake is done.
    noise: Option<snow::TransportState>,
    send_seq: u64,
    recv_seq: u64,
    sent_bytes: u64,
    /// Reused for sealing.
    scratch: Vec<u8>,
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

    /// The Noise handshake (see [`seal::NOISE_PATTERN`]): two messages, in
    /// `Hello` and `Welcome` frames of at most
    /// [`frame::MAX_HANDSHAKE_PAYLOAD`] bytes, all within one `timeout`.
    /// Each side's message is encrypted under the shared secret: a peer
    /// without it fails there, before anything else is read.
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
        let deadline = Instant::now() + timeout;
        stream.set_nodelay(true).map_err(io(&peer))?;
        stream.set_read_timeout(Some(timeout)).map_err(io(&peer))?;
        stream.set_write_timeout(Some(timeout)).map_err(io(&peer))?;
        ferry_sys::set_socket_buffers(&stream, SOCKET_BUFFER_BYTES);
        let writer_stream = stream.try_clone().map_err(io(&peer))?;
        let mut conn = Conn {
            reader: BufReader::with_capacity(1 << 20, stream),
            writer: BufWriter::with_capacity(1 << 20, writer_stream),
            peer,
            noise: None,
            send_seq: 0,
            recv_seq: 0,
            sent_bytes: 0,
            scratch: Vec::new(),
        };
        let noise_err = |conn: &Conn, why: &str| TransportError::Auth {
            peer: conn.peer.clone(),
            why: why.to_string(),
        };
        let psk = secret.derive("noise pre-shared key", &[]);
        let builder = seal::NOISE_PATTERN
            .parse()
            .map_err(|_| noise_err(&conn, "the Noise pattern does not parse"))
            .and_then(|params| {
                snow::Builder::new(params)
                    .psk(0, &psk)
                    .map_err(|_| noise_err(&conn, "the pre-shared key is refused"))
            })?;
        let mut buf = vec![0u8; seal::MAX_MESSAGE];
        let mut plain = vec![0u8; seal::MAX_MESSAGE];
        let hs = match role {
            Role::Client => {
                let mut hs = builder
                    .build_initiator()
                    .map_err(|_| noise_err(&conn, "cannot start the handshake"))?;
                let n = hs
                    .write_message(b"ferry client", &mut buf)
                    .map_err(|_| noise_err(&conn, "cannot write the handshake"))?;
                conn.send_plain(FrameKind::Hello, &buf[..n])?;
                let f = conn.recv_handshake(FrameKind::Welcome, "Welcome", deadline)?;
                hs.read_message(&f.payload, &mut plain)
                    .map_err(|_| noise_err(&conn, "the agent does not hold the same key"))?;
                hs
            }
            Role::Server => {
                let mut hs = builder
                    .build_responder()
                    .map_err(|_| noise_err(&conn, "cannot start the handshake"))?;
                let hello = conn
                    .recv_handshake(FrameKind::Hello, "Hello", deadline)
                    .and_then(|f| {
                        hs.read_message(&f.payload, &mut plain)
                            .map_err(|_| noise_err(&conn, "the peer does not hold the same key"))
                    });
                if let Err(e) = hello {
                    conn.refuse("authentication failed: wrong key or not a ferry peer");
                    return Err(e);
                }
                let n = hs
                    .write_message(b"ferry server", &mut buf)
                    .map_err(|_| noise_err(&conn, "cannot write the handshake"))?;
                conn.send_plain(FrameKind::Welcome, &buf[..n])?;
                hs
            }
        };
        conn.noise = Some(
            hs.into_transport_mode()
                .map_err(|_| noise_err(&conn, "the handshake did not complete"))?,
        );
        conn.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(io(&conn.peer))?;
        Ok(conn)
    }

    /// A handshake frame of `kind`, read before `deadline` (one deadline
    /// for the whole handshake: a peer trickling bytes does not hold the
    /// connection open for ever).
    fn recv_handshake(
        &mut self,
        kind: FrameKind,
        name: &'static str,
        deadline: Instant,
    ) -> Result<Frame, TransportError> {
        let mut r = Deadline {
            inner: &mut self.reader,
            deadline,
        };
        let got = frame::read_frame_keyed(&mut r, &|_| PUBLIC_KEY, frame::MAX_HANDSHAKE_PAYLOAD);
        let frame = match got {
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(fault))) => {
                return Err(TransportError::Auth {
                    peer: self.peer.clone(),
                    why: fault.to_string(),
                })
            }
            Ok(None) => {
                return Err(TransportError::Closed {
                    peer: self.peer.clone(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(TransportError::Closed {
                    peer: self.peer.clone(),
                })
            }
            Err(source) => return Err(self.io_err(source)),
        };
        match frame.kind {
            k if k == kind => Ok(frame),
            FrameKind::Refused => Err(TransportError::Refused {
                peer: self.peer.clone(),
                why: String::from_utf8_lossy(&frame.payload).into_owned(),
            }),
            other => Err(TransportError::Unexpected {
                peer: self.peer.clone(),
                got: format!("{other:?} frame"),
                expected: name,
            }),
        }
    }

    /// Writes a handshake frame (tagged with the public key: the Noise
    /// message inside authenticates itself).
    fn send_plain(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), TransportError> {
        frame::write_frame(&mut self.writer, &PUBLIC_KEY, kind, 0, 0, payload)
            .map_err(|source| self.io_err(source))?;
        self.sent_bytes += (frame::HEADER_LEN + payload.len() + frame::TAG_LEN) as u64;
        Ok(())
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
        let Some(noise) = self.noise.as_mut() else {
            return Err(TransportError::Auth {
                peer: self.peer.clone(),
                why: "nothing is sent before the handshake".into(),
            });
        };
        let n = seal::write_sealed(
            &mut self.writer,
            noise,
            kind,
            flags,
            seq,
            &body,
            &mut self.scratch,
        )
        .map_err(|source| TransportError::Io {
            peer: self.peer.clone(),
            source,
        })?;
        self.send_seq += 1;
        self.sent_bytes += n as u64;
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
        let Some(noise) = self.noise.as_mut() else {
            return Err(TransportError::Auth {
                peer: self.peer.clone(),
                why: "nothing is read before the handshake".into(),
            });
        };
        let got = seal::read_sealed(&mut self.reader, noise);
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
            frame.payload =
                decompress_bounded(&frame.payload, frame::MAX_PAYLOAD).map_err(|what| {
                    TransportError::BadFrame {
                        peer: self.peer.clone(),
                        what: format!("compressed payload refused: {what}"),
                    }
                })?;
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

/// Decompresses a payload whose zstd frame declares its size, into exactly
/// that many bytes: one that declares none, or more than `max`, is refused
/// before anything is allocated for it.
pub(crate) fn decompress_bounded(data: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let declared = zstd::zstd_safe::get_frame_content_size(data)
        .map_err(|_| "not a zstd frame".to_string())?
        .ok_or_else(|| "the zstd frame does not declare its size".to_string())?;
    if declared > max as u64 {
        return Err(format!(
            "it would decompress to {declared} bytes, over the limit of {max}"
        ));
    }
    let out = zstd::bulk::decompress(data, declared as usize).map_err(|e| e.to_string())?;
    if out.len() as u64 != declared {
        return Err(format!(
            "it decompressed to {} bytes, not the {declared} it declared",
            out.len()
        ));
    }
    Ok(out)
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

    /// The server's end, once its handshake is done.
    type ServerSide = std::thread::JoinHandle<Result<Conn, TransportError>>;
    /// What the relay saw the client send.
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

    /// A relay between a client and a server on loopback that records what
    /// the client sends and can damage it: `mangle(offset, byte)` returns
    /// the byte to forward (or None to cut the stream there).
    fn through_relay(
        secret: &[u8],
        mangle: impl Fn(usize, u8) -> Option<u8> + Send + 'static,
    ) -> (Conn, ServerSide, Seen) {
        use std::io::Write;
        let server_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (server_addr, relay_addr) = (
            server_l.local_addr().unwrap(),
            relay_l.local_addr().unwrap().to_string(),
        );
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            let (mut from_client, _) = relay_l.accept().unwrap();
            let mut to_server = TcpStream::connect(server_addr).unwrap();
            let (mut back_from, mut back_to) = (
                to_server.try_clone().unwrap(),
                from_client.try_clone().unwrap(),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            });
            let mut buf = [0u8; 65536];
            let mut at = 0;
            loop {
                let n = match from_client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    match mangle(at, b) {
                        Some(b) => out.push(b),
                        None => {
                            let _ = to_server.write_all(&out);
                            let _ = to_server.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                    at += 1;
                }
                seen2.lock().unwrap().extend_from_slice(&out);
                if to_server.write_all(&out).is_err() {
                    break;
                }
            }
            let _ = to_server.shutdown(std::net::Shutdown::Write);
        });
        let server_secret = Secret::from_bytes(secret);
        let server = std::thread::spawn(move || {
            let (s, _) = server_l.accept().unwrap();
            Conn::accept(s, &server_secret, Duration::from_secs(5))
        });
        let client = Conn::connect(
            &relay_addr,
            &Secret::from_bytes(secret),
            Duration::from_secs(5),
        )
        .unwrap();
        (client, server, seen)
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// Bytes zstd cannot shrink (xorshift).
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A small payload that would decompress past the limit (a zip bomb)
    /// is refused from its header; an honest one comes back whole.
    #[test]
    fn decompression_is_bounded_by_the_declared_size() {
        let bomb = zstd::bulk::compress(&vec![0u8; frame::MAX_PAYLOAD + 1], 1).unwrap();
        assert!(bomb.len() < 64 << 10);
        let e = decompress_bounded(&bomb, frame::MAX_PAYLOAD).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let packed = zstd::bulk::compress(&data, 1).unwrap();
        assert_eq!(
            decompress_bounded(&packed, frame::MAX_PAYLOAD).unwrap(),
            data
        );
        assert!(decompress_bounded(b"not zstd at all", 1 << 20).is_err());
        // Streamed frames do not declare their size: refused.
        let mut streamed = Vec::new();
        zstd::stream::copy_encode(&data[..], &mut streamed, 1).unwrap();
        let mut e = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        std::io::Write::write_all(&mut e, &data).unwrap();
        let streamed = e.finish().unwrap();
        assert!(decompress_bounded(&streamed, 1 << 20).is_err());
    }

    /// What crosses the wire holds no plaintext: a marker sent in a blob
    /// (not compressible: among random bytes) arrives, and is nowhere in
    /// the bytes the relay saw.
    #[test]
    fn nothing_crosses_the_wire_in_clear() {
        let marker = b"FERRY-TEST-MARKER-7f3a9c";
        let mut blob = noise(200_000);
        blob[100_000..100_000 + marker.len()].copy_from_slice(marker);
        let (mut c, server, seen) = through_relay(KEY, |_, b| Some(b));
        let mut s = server.join().unwrap().unwrap();
        c.send_msg(&Msg::Flush).unwrap();
        c.send_blob(&blob).unwrap();
        c.send_pages(&blob, false).unwrap();
        assert!(matches!(s.recv_msg().unwrap(), Msg::Flush));
        assert!(s.recv_blob().unwrap() == blob);
        assert!(matches!(s.recv().unwrap(), Some(Incoming::Pages(p)) if p == blob));
        let seen = seen.lock().unwrap();
        assert!(seen.len() > 400_000);
        assert!(
            !seen.windows(marker.len()).any(|w| w == marker),
            "the marker crossed the wire in clear"
        );
    }

    /// A byte flipped in transit, or the stream cut, after the handshake:
    /// the receiver gets an error, never the damaged bytes.
    #[test]
    fn damage_in_transit_is_refused() {
        // Past the handshake (a few hundred bytes), inside the blob.
        for flip_at in [600usize, 5_000, 60_000] {
            let (mut c, server, _) = through_relay(KEY, move |at, b| {
                Some(if at == flip_at { b ^ 1 } else { b })
            });
            let mut s = server.join().unwrap().unwrap();
            let _ = c.send_pages(&vec![9u8; 100_000], false);
            let got = s.recv().map(|_| ());
            assert!(got.is_err(), "a flipped byte at {flip_at} was accepted");
        }
        let (mut c, server, _) = through_relay(KEY, |at, b| (at < 3_000).then_some(b));
        let mut s = server.join().unwrap().unwrap();
        let _ = c.send_pages(&vec![9u8; 100_000], false);
        assert!(s.recv().is_err(), "a cut stream was taken for a frame");
    }

    /// A peer that trickles its handshake, or claims a huge first frame,
    /// is refused within the handshake's one deadline, and nothing large is
    /// allocated for it.
    #[test]
    fn a_slow_or_oversized_handshake_is_refused_in_time() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let start = Instant::now();
            let r = Conn::accept(s, &Secret::from_bytes(KEY), Duration::from_millis(600));
            (r.map(|_| ()), start.elapsed())
        });
        let mut slow = TcpStream::connect(addr).unwrap();
        for b in b"FRY1" {
            let _ = slow.write_all(&[*b]);
            std::thread::sleep(Duration::from_millis(250));
        }
        let (r, took) = server.join().unwrap();
        assert!(r.is_err());
        assert!(took < Duration::from_secs(2), "the handshake took {took:?}");

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            Conn::accept(s, &Secret::from_bytes(KEY), Duration::from_secs(5)).map(|_| ())
        });
        let mut big = TcpStream::connect(addr).unwrap();
        let header = frame::header(FrameKind::Hello, 0, 0, 64 << 20);
        big.write_all(&header).unwrap();
        let e = server.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }
}
