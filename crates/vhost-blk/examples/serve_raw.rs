//! Manual testing aid: serve a raw image file over vhost-user-blk until QEMU disconnects.
//! Usage: serve_raw IMAGE SOCKET [--ro] [--queues N] [--qsize N]; RUST_LOG=debug for request logs.

#[path = "../tests/common/mod.rs"]
mod common;

use fv_vhost_blk::{BlkBackendConfig, BlkServer};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().collect();
    let (Some(image), Some(socket)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: serve_raw IMAGE SOCKET [--ro] [--queues N] [--qsize N]");
    };
    let ro = args.iter().any(|a| a == "--ro");
    let mut cfg = BlkBackendConfig::new(socket);
    if let Some(i) = args.iter().position(|a| a == "--queues") {
        cfg.num_queues = args.get(i + 1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    }
    if let Some(i) = args.iter().position(|a| a == "--qsize") {
        cfg.queue_size = args
            .get(i + 1)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(256);
    }
    let dev = common::RawDevice::open(std::path::Path::new(image), ro);
    let server = BlkServer::new(dev, cfg)?;
    let stats = server.stats();
    server.serve()?;
    println!("{:?}", stats.snapshot());
    Ok(())
}
