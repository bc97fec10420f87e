//! Wire-level behaviour a stock client never exercises: simple replies, refused
//! writes, hostile lengths and garbage, and graceful shutdown. The peer here is a
//! minimal client written from the protocol text.
mod common;

use common::TrackedRaw;
use fv_nbd::{ExportOptions, ListenAddr, Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

struct Client(UnixStream);

impl Client {
    fn connect(sock: &std::path::Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client(s);
        assert_eq!(c.u64(), 0x4e42_444d_4147_4943);
        assert_eq!(c.u64(), IHAVEOPT);
        assert_eq!(c.u16(), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        c.send(&3u32.to_be_bytes());
        c
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// (option, reply type, data)
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let opt = self.u32();
        let ty = self.u32();
        let len = self.u32() as usize;
        (opt, ty, self.bytes(len))
    }
    /// NBD_OPT_GO for the default export; returns (size, transmission flags).
    fn go(&mut self) -> (u64, u16) {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut info = None;
        loop {
            let (opt, ty, data) = self.opt_reply();
            assert_eq!(opt, 7);
            match ty {
                3 if data[0..2] == [0, 0] => {
                    info = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes(data[10..12].try_into().unwrap()),
                    ))
                }
                3 => {}
                1 => return info.unwrap(),
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
    }
    fn request(&mut self, flags: u16, ty: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }
    /// Simple reply: (error, handle).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), 0x6744_6698);
        (self.u32(), self.u64())
    }
    /// Is the connection closed by the server (EOF)?
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn server(
    dir: &std::path::Path,
    opts: ExportOptions,
    ro: bool,
) -> (
    fv_nbd::RunningServer,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let img = dir.join("disk.raw");
    let sock = dir.join("s.sock");
    let dev = if ro {
        std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
        TrackedRaw::open(&img, true)
    } else {
        TrackedRaw::create(&img, 1 << 20)
    };
    let srv = Server::bind(&ListenAddr::Unix(sock.clone()), Arc::new(dev), opts)
        .unwrap()
        .spawn();
    (srv, sock, img)
}

#[test]
fn simple_replies_without_structured_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, img) = server(dir.path(), ExportOptions::default(), false);
    let mut c = Client::connect(&sock);
    let (size, flags) = c.go();
    assert_eq!(size, 1 << 20);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN; no DF.
    assert_eq!(flags, 1 | 4 | 8 | 32 | 64 | 256);
    c.request(1, 1, 7, 4096, 512, &[0xabu8; 512]); // FUA write
    assert_eq!(c.simple(), (0, 7));
    c.request(0, 0, 8, 4096, 512, &[]);
    assert_eq!(c.simple(), (0, 8));
    assert_eq!(c.bytes(512), vec![0xab; 512]);
    // Read past the end: EINVAL, no payload; write past the end: ENOSPC.
    c.request(0, 0, 9, (1 << 20) - 512, 1024, &[]);
    assert_eq!(c.simple(), (22, 9));
    c.request(0, 1, 10, 1 << 20, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (28, 10));
    // Block status without a negotiated context, unknown command, bad flag: EINVAL.
    c.request(0, 7, 11, 0, 4096, &[]);
    assert_eq!(c.simple(), (22, 11));
    c.request(0, 42, 12, 0, 0, &[]);
    assert_eq!(c.simple(), (22, 12));
    c.request(1 << 9, 3, 13, 0, 0, &[]);
    assert_eq!(c.simple(), (22, 13));
    // Oversized read is refused but the connection stays usable.
    c.request(0, 0, 14, 0, 64 << 20, &[]);
    assert_eq!(c.simple().1, 14);
    c.request(0, 3, 15, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 15));
    c.request(0, 2, 16, 0, 0, &[]); // DISC
    assert!(c.closed());
    srv.stop().unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, 4096)
        .unwrap();
    assert_eq!(b, [0xab; 512]);
}

#[test]
fn structured_replies_and_meta_context_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, _img) = server(dir.path(), ExportOptions::default(), false);
    let mut c = Client::connect(&sock);
    // Meta context before structured replies: invalid.
    let mut q = 0u32.to_be_bytes().to_vec();
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&15u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    c.option(10, &q);
    assert_eq!(c.opt_reply().1, 0x8000_0003);
    c.option(8, &[]);
    assert_eq!(c.opt_reply().1, 1);
    // LIST with no queries shows base:allocation.
    let mut l = 0u32.to_be_bytes().to_vec();
    l.extend_from_slice(&0u32.to_be_bytes());
    c.option(9, &l);
    let (_, ty, data) = c.opt_reply();
    assert_eq!(ty, 4);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(c.opt_reply().1, 1);
    // SET selects it with a non-zero id.
    c.option(10, &q);
    let (_, ty, data) = c.opt_reply();
    assert_eq!(ty, 4);
    let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
    assert_ne!(id, 0);
    assert_eq!(c.opt_reply().1, 1);
    // Malformed: a query length running past the data.
    let mut bad = 0u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&1u32.to_be_bytes());
    bad.extend_from_slice(&1000u32.to_be_bytes());
    c.option(10, &bad);
    assert_eq!(c.opt_reply().1, 0x8000_0003);
    // Unknown option, TLS: errors, haggling continues.
    c.option(99, b"junk");
    assert_eq!(c.opt_reply().1, 0x8000_0001);
    c.option(5, &[]);
    assert!(c.opt_reply().1 & 0x8000_0000 != 0);
    // GO for an unknown export name: ERR_UNKNOWN.
    let mut g = 4u32.to_be_bytes().to_vec();
    g.extend_from_slice(b"nope");
    g.extend_from_slice(&0u16.to_be_bytes());
    c.option(7, &g);
    assert_eq!(c.opt_reply().1, 0x8000_0006);
    // The malformed SET above cleared nothing (it failed): select again, then GO.
    c.option(10, &q);
    c.opt_reply();
    c.opt_reply();
    let (_, flags) = c.go();
    assert!(flags & 128 != 0, "SEND_DF with structured replies");

    c.request(0, 1, 1, 0, 8192, &[9u8; 8192]);
    assert_eq!(c.simple(), (0, 1));
    // Block status: one chunk, DONE, context id, data then hole.
    c.request(0, 7, 2, 0, 1 << 20, &[]);
    assert_eq!(c.u32(), 0x668e_33ef);
    assert_eq!(c.u16(), 1);
    assert_eq!(c.u16(), 5);
    assert_eq!(c.u64(), 2);
    let len = c.u32();
    assert_eq!(len, 4 + 16);
    assert_eq!(c.u32(), id);
    assert_eq!((c.u32(), c.u32()), (64 << 10, 0));
    assert_eq!((c.u32(), c.u32()), ((1 << 20) - (64 << 10), 3));
    // Read: one OFFSET_DATA chunk with DONE.
    c.request(0, 0, 3, 4096, 512, &[]);
    assert_eq!(c.u32(), 0x668e_33ef);
    assert_eq!((c.u16(), c.u16(), c.u64(), c.u32()), (1, 1, 3, 8 + 512));
    assert_eq!(c.u64(), 4096);
    assert_eq!(c.bytes(512), vec![9u8; 512]);
    // A failing read is an ERROR chunk with a message.
    c.request(0, 0, 4, 1 << 20, 512, &[]);
    assert_eq!(c.u32(), 0x668e_33ef);
    assert_eq!((c.u16(), c.u16(), c.u64()), (1, 0x8001, 4));
    let len = c.u32() as usize;
    let payload = c.bytes(len);
    assert_eq!(u32::from_be_bytes(payload[0..4].try_into().unwrap()), 22);
    assert!(len > 6, "error chunk carries a message");
    drop(srv);
}

#[test]
fn read_only_export_answers_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, img) = server(
        dir.path(),
        ExportOptions {
            read_only: true,
            ..Default::default()
        },
        true,
    );
    let mut c = Client::connect(&sock);
    let (_, flags) = c.go();
    assert_eq!(flags & 2, 2, "READ_ONLY flag");
    assert_eq!(
        flags & (32 | 64),
        0,
        "no TRIM/WRITE_ZEROES on a read-only export"
    );
    c.request(0, 1, 1, 0, 512, &[0u8; 512]);
    assert_eq!(c.simple(), (1, 1));
    c.request(0, 4, 2, 0, 4096, &[]);
    assert_eq!(c.simple(), (1, 2));
    c.request(0, 6, 3, 0, 4096, &[]);
    assert_eq!(c.simple(), (1, 3));
    c.request(0, 0, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.bytes(512), vec![0x42; 512]);
    drop(c);
    srv.stop().unwrap();
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x42));
}

#[test]
fn hostile_input_ends_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, _img) = server(dir.path(), ExportOptions::default(), false);

    // Unknown client flags.
    let mut c = Client(UnixStream::connect(&sock).unwrap());
    c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.bytes(18);
    c.send(&0xffff_ffffu32.to_be_bytes());
    assert!(c.closed());

    // Huge option length: disconnect instead of allocating.
    let mut c = Client::connect(&sock);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    assert!(c.closed());

    // Bad option magic.
    let mut c = Client::connect(&sock);
    c.send(&[0u8; 16]);
    assert!(c.closed());

    // Truncated GO data / name longer than the data: ERR_INVALID.
    let mut c = Client::connect(&sock);
    let mut g = 100u32.to_be_bytes().to_vec();
    g.extend_from_slice(b"ab");
    c.option(7, &g);
    assert_eq!(c.opt_reply().1, 0x8000_0003);
    // Then an oversized write (64 MiB announced): hard disconnect.
    c.go();
    c.request(0, 1, 1, 0, 64 << 20, &[]);
    assert!(c.closed());

    // Garbage request magic.
    let mut c = Client::connect(&sock);
    c.go();
    c.send(&[0xeeu8; 28]);
    assert!(c.closed());

    // Offset + length overflowing u64.
    let mut c = Client::connect(&sock);
    c.go();
    c.request(0, 0, 5, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple(), (22, 5));
    c.request(0, 6, 6, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple(), (28, 6));

    // EXPORT_NAME with an unknown name ends the session.
    let mut c = Client::connect(&sock);
    c.option(1, b"no-such-export");
    assert!(c.closed());

    // ABORT is acknowledged.
    let mut c = Client::connect(&sock);
    c.option(2, &[]);
    assert_eq!(c.opt_reply().1, 1);
    assert!(c.closed());

    // EXPORT_NAME for the default export still works after all of that.
    let mut c = Client::connect(&sock);
    c.option(1, b"");
    assert_eq!(c.u64(), 1 << 20);
    assert_eq!(c.u16() & 1, 1);
    c.request(0, 0, 9, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 9));
    assert_eq!(c.bytes(512), vec![0; 512]);
    drop(srv);
}

#[test]
fn shutdown_finishes_connections_flushes_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, img) = server(dir.path(), ExportOptions::default(), false);
    let mut c = Client::connect(&sock);
    c.go();
    c.request(0, 1, 1, 0, 4096, &[0x61u8; 4096]);
    assert_eq!(c.simple(), (0, 1));
    // A client still in option haggling is told the server is going away.
    let mut h = Client::connect(&sock);
    let stopper = std::thread::spawn(move || srv.stop());
    // The idle transmission-phase client sees the connection end.
    assert!(c.closed());
    let summary = stopper.join().unwrap().unwrap();
    assert_eq!(summary.connections, 2);
    assert!(h.closed());
    assert!(!sock.exists(), "socket file removed");
    assert!(std::fs::read(&img).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0x61));
    // A new server can bind the same path afterwards.
    let again = Server::bind(
        &ListenAddr::Unix(sock.clone()),
        Arc::new(TrackedRaw::open(&img, false)),
        ExportOptions::default(),
    )
    .unwrap();
    drop(again);
}

#[test]
fn bind_refuses_a_live_socket_and_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, sock, img) = server(dir.path(), ExportOptions::default(), false);
    let err = Server::bind(
        &ListenAddr::Unix(sock.clone()),
        Arc::new(TrackedRaw::open(&img, true)),
        ExportOptions::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, fv_nbd::NbdError::AddressInUse { .. }),
        "{err}"
    );
    let err = Server::bind(
        &ListenAddr::Unix(img.clone()),
        Arc::new(TrackedRaw::open(&img, true)),
        ExportOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, fv_nbd::NbdError::Bind { .. }), "{err}");
    drop(srv);
    assert!(img.exists());
}
