//! A container's files, moved ahead of the freeze: while the container
//! runs, each of its trees (writable layer, volumes, marked bind mounts)
//! is captured and streamed to the agent, which keeps it beside the
//! session's images. The capture while frozen then holds only what
//! changed since (by inode and change time), and what is gone.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use ferry_core::checkpoint;
use ferry_core::target::fs::{self as files, FsBase, FsScope, BASE_PREFIX};
use ferry_core::target::ContainerRef;
use ferry_transport::{Conn, Msg};

use super::MigrateError;

/// Bytes per blob of a tree on its way.
const CHUNK: usize = 8 << 20;

/// What went ahead of the freeze.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FilesAhead {
    pub trees: usize,
    pub bytes: u64,
    pub ms: f64,
}

/// Sends the container's trees that `scope` names; returns the scope the
/// final dump captures with (against what was sent) and what was sent.
pub(crate) fn send_ahead(
    control: &mut Conn,
    container: &ContainerRef,
    scope: &FsScope,
) -> Result<(FsScope, FilesAhead), MigrateError> {
    let start = Instant::now();
    let sources = checkpoint::container_files(container, scope)
        .map_err(|e| MigrateError::FilesAhead(Box::new(e)))?;
    let mut base = FsBase::default();
    let mut ahead = FilesAhead::default();
    for (n, s) in sources.iter().enumerate() {
        let name = format!("{BASE_PREFIX}{}", s.tar_name(n));
        let estimate = files::tree_bytes(&s.path);
        let sent = MigrateError::FilesAheadSent;
        control
            .send_msg(&Msg::FilesBase {
                name: name.clone(),
                bytes: estimate,
            })
            .map_err(sent)?;
        let mut out = Blobs {
            conn: control,
            buf: Vec::with_capacity(CHUNK),
        };
        let failed = |e: files::FsError| MigrateError::FilesAhead(Box::new(e.into()));
        let captured =
            files::capture_into(&s.path, &mut out, &s.path, s.kind.is_layer(), None, true)
                .map_err(failed)?;
        out.flush()
            .map_err(|e| failed(files::FsError::io("send", &s.path)(e)))?;
        control.send_blob(&[]).map_err(sent)?;
        match control.recv_msg().map_err(sent)? {
            Msg::FilesStored { bytes } => ahead.bytes += bytes,
            other => {
                return Err(sent(ferry_transport::TransportError::BadFrame {
                    peer: control.peer().to_string(),
                    what: format!("{} where files_stored was expected", other.kind()),
                }))
            }
        }
        base.roots.push((s.kind.clone(), name, captured.snapshot));
        ahead.trees += 1;
    }
    ahead.ms = start.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        trees = ahead.trees,
        bytes = ahead.bytes,
        ms = ahead.ms,
        "the container's files went ahead of the freeze"
    );
    let scope = FsScope {
        base: Some(Arc::new(base)),
        ..scope.clone()
    };
    Ok((scope, ahead))
}

/// A tar on its way: blobs of [`CHUNK`] bytes.
struct Blobs<'a> {
    conn: &'a mut Conn,
    buf: Vec<u8>,
}

impl Write for Blobs<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.conn.send_blob(&self.buf).map_err(io::Error::other)?;
            self.buf.clear();
        }
        Ok(())
    }
}
