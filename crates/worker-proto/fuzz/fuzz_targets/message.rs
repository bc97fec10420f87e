//! Fuzz the worker protocol's message decoding: every line is decoded the way
//! fv-worker (`Message`, then its `Request`) and fvd (`Message`) decode what arrives
//! on worker.sock, and the launch spec the way fv-worker reads `--launch FILE`.
//! Decoding must return a value or an error, never panic; and whatever decodes must
//! re-encode with `fv_worker_proto::encode` into a line that decodes again.
#![no_main]

use fv_worker_proto::{encode, LaunchSpec, Message, Request, WorkerStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(m) = serde_json::from_slice::<Message>(line) {
            let s = encode(&m).expect("a decoded message encodes");
            assert!(s.ends_with('\n') && !s[..s.len() - 1].contains('\n'));
            serde_json::from_str::<Message>(s.trim_end())
                .unwrap_or_else(|e| panic!("own encoding {s:?} does not decode: {e}"));
        }
        if let Ok(r) = serde_json::from_slice::<Request>(line) {
            let s = encode(&r).expect("a decoded request encodes");
            serde_json::from_str::<Request>(s.trim_end())
                .unwrap_or_else(|e| panic!("own encoding {s:?} does not decode: {e}"));
        }
        let _ = serde_json::from_slice::<WorkerStatus>(line);
    }
    if let Ok(spec) = serde_json::from_slice::<LaunchSpec>(data) {
        let s = serde_json::to_vec(&spec).expect("a decoded launch spec encodes");
        serde_json::from_slice::<LaunchSpec>(&s).expect("own launch spec encoding decodes");
    }
});
