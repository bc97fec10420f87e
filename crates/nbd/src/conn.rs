//! One client connection: option haggling, then the transmission phase.
use crate::proto::*;
use crate::stream::Stream;
use crate::{align, ExportOptions, Shared};
use fv_vdisk_core::{BlockDevice, DiskError, ExtentState};
use std::io::{self, BufReader, BufWriter, Read, Write};

/// Why a connection ended other than by the client's choice.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn violation(s: impl Into<String>) -> ConnError {
    ConnError::Protocol(s.into())
}

/// Per-export facts fixed for the server's lifetime.
pub(crate) struct ExportCtx {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) read_only: bool,
    pub(crate) multi_conn: bool,
    pub(crate) size: u64,
    pub(crate) min_block: u32,
    pub(crate) preferred_block: u32,
    pub(crate) handshake_timeout: std::time::Duration,
}

impl ExportCtx {
    pub(crate) fn new(dev: &std::sync::Arc<dyn BlockDevice>, o: &ExportOptions) -> Self {
        let min = align::sector_of(dev.as_ref()) as u32;
        let phys = dev.physical_sector_size();
        let preferred = if phys.is_power_of_two() {
            phys.clamp(4096, 65536)
        } else {
            4096
        }
        .max(min);
        ExportCtx {
            name: o.name.clone(),
            description: o.description.clone(),
            read_only: o.read_only || dev.read_only(),
            multi_conn: o.multi_conn,
            size: dev.size(),
            min_block: min,
            preferred_block: preferred,
            handshake_timeout: o.handshake_timeout,
        }
    }

    fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if structured {
            // Reads are always answered with a single content chunk.
            f |= FLAG_SEND_DF;
        }
        if self.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// What option haggling settled on.
#[derive(Default)]
struct Negotiated {
    structured: bool,
    base_allocation: bool,
}

pub(crate) fn serve_connection(
    stream: Stream,
    dev: &dyn BlockDevice,
    ctx: &ExportCtx,
    shared: &Shared,
) -> Result<(), ConnError> {
    stream.set_read_timeout(Some(ctx.handshake_timeout))?;
    let r = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    let w = BufWriter::with_capacity(256 << 10, stream.try_clone()?);
    session(r, w, dev, ctx, shared, || stream.set_read_timeout(None))
}

/// Option haggling, then the transmission phase, over any byte stream (a socket in
/// service; an in-memory buffer for the fuzz target). `after_handshake` runs between
/// the two (the socket's handshake timeout is lifted there).
pub(crate) fn session<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    dev: &dyn BlockDevice,
    ctx: &ExportCtx,
    shared: &Shared,
    after_handshake: impl FnOnce() -> io::Result<()>,
) -> Result<(), ConnError> {
    let Some(neg) = handshake(&mut r, &mut w, ctx, shared)? else {
        return Ok(());
    };
    after_handshake()?;
    let mut conn = Transmission {
        r,
        w,
        dev,
        ctx,
        shared,
        neg,
        wrote: false,
        buf: Vec::new(),
    };
    let res = conn.run();
    // Writes acknowledged on this connection reach stable storage when the client
    // leaves, even if it never sent FLUSH.
    if conn.wrote {
        if let Err(e) = dev.flush() {
            tracing::warn!("nbd: flush at disconnect failed: {e}");
        }
    }
    res
}

fn get_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(w: &mut impl Write, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&ty.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

fn opt_error(w: &mut impl Write, opt: u32, ty: u32, msg: &str) -> io::Result<()> {
    opt_reply(w, opt, ty, msg.as_bytes())?;
    w.flush()
}

/// A cursor over option data that reports malformed input instead of panicking.
struct Cursor<'a>(&'a [u8]);
impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32-length-prefixed string of at most MAX_STRING bytes.
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        (!s.contains('\0')).then_some(s)
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Returns None when the client ended the session during haggling.
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    ctx: &ExportCtx,
    shared: &Shared,
) -> Result<Option<Negotiated>, ConnError> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let cflags = get_u32(r)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut neg = Negotiated::default();

    for _ in 0..MAX_OPTIONS {
        let magic = get_u64(r)?;
        if magic != IHAVEOPT {
            return Err(violation(format!("bad option magic {magic:#x}")));
        }
        let opt = get_u32(r)?;
        let len = get_u32(r)?;
        if len > MAX_OPTION_LEN {
            // Cannot skip an arbitrarily large payload cheaply; a hard disconnect is
            // what the protocol allows for a client behaving like this.
            return Err(violation(format!("option {opt} data of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;

        if shared.stopping() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            opt_error(w, opt, REP_ERR_SHUTDOWN, "server is shutting down")?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| violation("export name is not UTF-8"))?;
                if !ctx.matches(name) {
                    // EXPORT_NAME cannot return an error: the session just ends.
                    return Err(violation(format!("unknown export '{name}'")));
                }
                w.write_all(&ctx.size.to_be_bytes())?;
                w.write_all(&ctx.transmission_flags(neg.structured).to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(Some(neg));
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]).and_then(|_| w.flush());
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_error(w, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut d = Vec::new();
                d.extend_from_slice(&(ctx.name.len() as u32).to_be_bytes());
                d.extend_from_slice(ctx.name.as_bytes());
                d.extend_from_slice(ctx.description.as_bytes());
                opt_reply(w, opt, REP_SERVER, &d)?;
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
            }
            OPT_STARTTLS => opt_error(w, opt, REP_ERR_POLICY, "TLS is not offered by this server")?,
            OPT_INFO | OPT_GO => {
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u16()?;
                    let mut reqs = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        reqs.push(c.u16()?);
                    }
                    c.done().then_some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    opt_error(w, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")?;
                    continue;
                };
                if !ctx.matches(name) {
                    opt_error(w, opt, REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let mut exp = Vec::with_capacity(12);
                exp.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                exp.extend_from_slice(&ctx.size.to_be_bytes());
                exp.extend_from_slice(&ctx.transmission_flags(neg.structured).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &exp)?;
                for req in dedup(reqs) {
                    let mut d = req.to_be_bytes().to_vec();
                    match req {
                        INFO_NAME => d.extend_from_slice(ctx.name.as_bytes()),
                        INFO_DESCRIPTION => d.extend_from_slice(ctx.description.as_bytes()),
                        INFO_BLOCK_SIZE => {
                            d.extend_from_slice(&ctx.min_block.to_be_bytes());
                            d.extend_from_slice(&ctx.preferred_block.to_be_bytes());
                            d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        }
                        _ => continue,
                    }
                    opt_reply(w, opt, REP_INFO, &d)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    return Ok(Some(neg));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_error(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                neg.structured = true;
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !neg.structured {
                    opt_error(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )?;
                    continue;
                }
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u32()?;
                    let mut qs = Vec::new();
                    for _ in 0..n {
                        qs.push(c.string()?);
                    }
                    c.done().then_some((name, qs))
                })();
                let Some((name, queries)) = parsed else {
                    opt_error(w, opt, REP_ERR_INVALID, "malformed meta context data")?;
                    continue;
                };
                if !ctx.matches(name) {
                    opt_error(w, opt, REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let list = opt == OPT_LIST_META_CONTEXT;
                let selected = (list && queries.is_empty())
                    || queries
                        .iter()
                        .any(|q| *q == BASE_ALLOCATION || *q == "base:");
                if !list {
                    neg.base_allocation = selected;
                }
                if selected {
                    let id = if list { 0 } else { BASE_ALLOCATION_ID };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(w, opt, REP_META_CONTEXT, &d)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
            }
            _ => opt_error(w, opt, REP_ERR_UNSUP, "option not supported")?,
        }
    }
    Err(violation("too many options"))
}

fn dedup(mut v: Vec<u16>) -> Vec<u16> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Protocol error number for a device error.
fn errno(e: &DiskError) -> u32 {
    match e {
        DiskError::ReadOnly { .. } => EPERM,
        DiskError::NoSpace { .. } => ENOSPC,
        DiskError::OutOfRange { .. }
        | DiskError::Unaligned { .. }
        | DiskError::InvalidArgument(_) => EINVAL,
        DiskError::Unsupported { .. } => ENOTSUP,
        DiskError::Io { source, .. } => match source.raw_os_error() {
            // ENOSPC, EDQUOT, EFBIG all mean "out of space" to the client.
            Some(28) | Some(122) | Some(27) => ENOSPC,
            _ => EIO,
        },
        _ => EIO,
    }
}

struct Transmission<'a, R: Read, W: Write> {
    r: R,
    w: W,
    dev: &'a dyn BlockDevice,
    ctx: &'a ExportCtx,
    shared: &'a Shared,
    neg: Negotiated,
    wrote: bool,
    buf: Vec<u8>,
}

/// A request failed: errno plus a message for structured error chunks.
struct Fail(u32, String);

impl<R: Read, W: Write> Transmission<'_, R, W> {
    fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let mut h = [0u8; 28];
            match self.r.read_exact(&mut h) {
                Ok(()) => {}
                // The client hung up (or we shut the read side down): clean end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            let be64 = |o: usize| (u64::from(be32(o)) << 32) | u64::from(be32(o + 4));
            let magic = be32(0);
            if magic != REQUEST_MAGIC {
                return Err(violation(format!("bad request magic {magic:#x}")));
            }
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let ty = u16::from_be_bytes([h[6], h[7]]);
            let handle = be64(8);
            let offset = be64(16);
            let length = be32(24);

            if ty == CMD_WRITE {
                if length > MAX_PAYLOAD {
                    // The payload follows the header; we cannot stay in sync without
                    // reading it, and will not buffer it.
                    return Err(violation(format!(
                        "write of {length} bytes exceeds {MAX_PAYLOAD}"
                    )));
                }
                self.buf.resize(length as usize, 0);
                self.r.read_exact(&mut self.buf)?;
            }
            if ty == CMD_DISC {
                return Ok(());
            }
            if self.shared.stopping() && ty != CMD_FLUSH {
                self.reply_err(handle, Fail(ESHUTDOWN, "server is shutting down".into()))?;
                continue;
            }
            match ty {
                CMD_READ => match self.read(flags, offset, length) {
                    Ok(()) => self.reply_read(handle, offset)?,
                    Err(f) => self.reply_err(handle, f)?,
                },
                CMD_BLOCK_STATUS => match self.block_status(flags, offset, length) {
                    Ok(descs) => self.reply_status(handle, &descs)?,
                    Err(f) => self.reply_err(handle, f)?,
                },
                _ => {
                    let res = match ty {
                        CMD_WRITE => self.write(flags, offset),
                        CMD_FLUSH => self.flush(flags),
                        CMD_TRIM => self.trim(flags, offset, length),
                        CMD_WRITE_ZEROES => self.write_zeroes(flags, offset, length),
                        _ => Err(Fail(EINVAL, format!("unknown command {ty}"))),
                    };
                    match res {
                        Ok(()) => self.reply_simple(handle, 0)?,
                        Err(f) => self.reply_err(handle, f)?,
                    }
                }
            }
        }
    }

    fn check_flags(flags: u16, allowed: u16) -> Result<(), Fail> {
        if flags & !allowed != 0 {
            return Err(Fail(
                EINVAL,
                format!("command flags {flags:#x} not valid here"),
            ));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64, err: u32) -> Result<(), Fail> {
        match offset.checked_add(len) {
            Some(end) if end <= self.ctx.size => Ok(()),
            _ => Err(Fail(
                err,
                format!(
                    "range {offset}+{len} is outside the export ({} bytes)",
                    self.ctx.size
                ),
            )),
        }
    }

    fn writable(&self) -> Result<(), Fail> {
        if self.ctx.read_only {
            return Err(Fail(EPERM, "export is read-only".into()));
        }
        Ok(())
    }

    fn disk(r: fv_vdisk_core::Result<()>) -> Result<(), Fail> {
        r.map_err(|e| Fail(errno(&e), e.to_string()))
    }

    fn fua(&mut self, flags: u16) -> Result<(), Fail> {
        if flags & CMD_FLAG_FUA != 0 {
            Self::disk(self.dev.flush())?;
        }
        Ok(())
    }

    fn read(&mut self, flags: u16, offset: u64, length: u32) -> Result<(), Fail> {
        Self::check_flags(
            flags,
            CMD_FLAG_FUA | if self.neg.structured { CMD_FLAG_DF } else { 0 },
        )?;
        if length > MAX_PAYLOAD {
            return Err(Fail(
                EOVERFLOW,
                format!("read of {length} bytes exceeds {MAX_PAYLOAD}"),
            ));
        }
        if length == 0 {
            return Err(Fail(EINVAL, "zero-length read".into()));
        }
        self.check_range(offset, length.into(), EINVAL)?;
        self.buf.resize(length as usize, 0);
        Self::disk(align::read(self.dev, offset, &mut self.buf))
    }

    fn write(&mut self, flags: u16, offset: u64) -> Result<(), Fail> {
        Self::check_flags(flags, CMD_FLAG_FUA)?;
        self.writable()?;
        self.check_range(offset, self.buf.len() as u64, ENOSPC)?;
        if self.buf.is_empty() {
            return Ok(());
        }
        self.wrote = true;
        Self::disk(align::write(self.dev, &self.shared.rmw, offset, &self.buf))?;
        self.fua(flags)
    }

    fn flush(&mut self, flags: u16) -> Result<(), Fail> {
        Self::check_flags(flags, CMD_FLAG_FUA)?;
        if self.ctx.read_only {
            return Ok(());
        }
        Self::disk(self.dev.flush())
    }

    fn trim(&mut self, flags: u16, offset: u64, length: u32) -> Result<(), Fail> {
        Self::check_flags(flags, CMD_FLAG_FUA)?;
        self.writable()?;
        self.check_range(offset, length.into(), ENOSPC)?;
        if length == 0 {
            return Ok(());
        }
        self.wrote = true;
        Self::disk(align::discard(self.dev, offset, length.into()))?;
        self.fua(flags)
    }

    fn write_zeroes(&mut self, flags: u16, offset: u64, length: u32) -> Result<(), Fail> {
        Self::check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)?;
        self.writable()?;
        self.check_range(offset, length.into(), ENOSPC)?;
        if length == 0 {
            return Ok(());
        }
        self.wrote = true;
        let no_hole = flags & CMD_FLAG_NO_HOLE != 0;
        Self::disk(align::zero(
            self.dev,
            &self.shared.rmw,
            offset,
            length.into(),
            no_hole,
        ))?;
        self.fua(flags)
    }

    fn block_status(
        &mut self,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u32, u32)>, Fail> {
        Self::check_flags(flags, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE)?;
        if !self.neg.structured || !self.neg.base_allocation {
            return Err(Fail(EINVAL, "no metadata context negotiated".into()));
        }
        if length == 0 {
            return Err(Fail(EINVAL, "zero-length block status".into()));
        }
        self.check_range(offset, length.into(), EINVAL)?;
        let extents = self
            .dev
            .block_status(offset, length.into())
            .map_err(|e| Fail(errno(&e), e.to_string()))?;
        let req_one = flags & CMD_FLAG_REQ_ONE != 0;
        Ok(descriptors(
            offset,
            length,
            &extents,
            if req_one { 1 } else { MAX_DESCRIPTORS },
        ))
    }

    // ---- replies ----

    fn reply_simple(&mut self, handle: u64, error: u32) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&error.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        self.w.write_all(&h)?;
        self.w.flush()
    }

    fn chunk_header(&mut self, flags: u16, ty: u16, handle: u64, len: u32) -> io::Result<()> {
        let mut h = [0u8; 20];
        h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&ty.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..20].copy_from_slice(&len.to_be_bytes());
        self.w.write_all(&h)
    }

    fn reply_read(&mut self, handle: u64, offset: u64) -> io::Result<()> {
        if self.neg.structured {
            // buf is at most MAX_PAYLOAD, so the chunk length fits in u32.
            let len = self.buf.len() as u32 + 8;
            self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, len)?;
            self.w.write_all(&offset.to_be_bytes())?;
        } else {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h[8..16].copy_from_slice(&handle.to_be_bytes());
            self.w.write_all(&h)?;
        }
        self.w.write_all(&self.buf)?;
        self.w.flush()
    }

    fn reply_status(&mut self, handle: u64, descs: &[(u32, u32)]) -> io::Result<()> {
        let len = 4 + 8 * descs.len() as u32;
        self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len)?;
        let mut d = Vec::with_capacity(len as usize);
        d.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (l, s) in descs {
            d.extend_from_slice(&l.to_be_bytes());
            d.extend_from_slice(&s.to_be_bytes());
        }
        self.w.write_all(&d)?;
        self.w.flush()
    }

    fn reply_err(&mut self, handle: u64, f: Fail) -> io::Result<()> {
        let Fail(err, msg) = f;
        tracing::debug!("nbd request failed: errno {err}: {msg}");
        if !self.neg.structured {
            // A simple error reply (even to a read) carries no payload.
            return self.reply_simple(handle, err);
        }
        let mut m = msg.as_str();
        while m.len() > 1024 {
            let mut cut = 1024;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m = &m[..cut];
        }
        self.chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            6 + m.len() as u32,
        )?;
        self.w.write_all(&err.to_be_bytes())?;
        self.w.write_all(&(m.len() as u16).to_be_bytes())?;
        self.w.write_all(m.as_bytes())?;
        self.w.flush()
    }
}

/// base:allocation flags for an extent state.
fn state_flags(s: ExtentState) -> u32 {
    match s {
        ExtentState::Absent => STATE_HOLE | STATE_ZERO,
        ExtentState::Zero => STATE_ZERO,
        ExtentState::Data => 0,
    }
}

/// Turn device extents into consecutive descriptors covering a prefix of
/// `[offset, offset+length)`: gaps become status 0 (always a safe answer), overlaps
/// and out-of-range parts are cut, equal neighbours merged.
fn descriptors(
    offset: u64,
    length: u32,
    extents: &[fv_vdisk_core::Extent],
    max: usize,
) -> Vec<(u32, u32)> {
    let end = offset + u64::from(length);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut cur = offset;
    let push = |out: &mut Vec<(u32, u32)>, len: u64, st: u32| {
        // len <= length <= u32::MAX by construction.
        let len = len as u32;
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += len,
            _ => out.push((len, st)),
        }
    };
    for e in extents {
        if cur >= end || out.len() > max {
            break;
        }
        let e_end = e.offset.saturating_add(e.length).min(end);
        if e_end <= cur {
            continue;
        }
        if e.offset > cur {
            let gap_end = e.offset.min(end);
            push(&mut out, gap_end - cur, 0);
            cur = gap_end;
            if cur >= end {
                break;
            }
        }
        push(&mut out, e_end - cur, state_flags(e.state));
        cur = e_end;
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    out.truncate(max.max(1));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fv_vdisk_core::Extent;

    fn ext(offset: u64, length: u64, state: ExtentState) -> Extent {
        Extent {
            offset,
            length,
            state,
        }
    }

    #[test]
    fn descriptors_cover_and_merge() {
        let e = [
            ext(0, 4096, ExtentState::Data),
            ext(4096, 4096, ExtentState::Data),
            ext(8192, 8192, ExtentState::Absent),
            ext(16384, 4096, ExtentState::Zero),
        ];
        assert_eq!(
            descriptors(0, 20480, &e, 100),
            vec![
                (8192, 0),
                (8192, STATE_HOLE | STATE_ZERO),
                (4096, STATE_ZERO)
            ]
        );
        // Clipped to the request, gap filled with 0, REQ_ONE keeps one.
        assert_eq!(descriptors(6144, 4096, &e, 100), vec![(2048, 0), (2048, 3)]);
        assert_eq!(descriptors(6144, 4096, &e, 1), vec![(2048, 0)]);
        let gap = [ext(8192, 4096, ExtentState::Zero)];
        assert_eq!(descriptors(0, 16384, &gap, 100), vec![(8192, 0), (4096, 2)]);
        assert_eq!(descriptors(0, 512, &[], 100), vec![(512, 0)]);
    }
}
