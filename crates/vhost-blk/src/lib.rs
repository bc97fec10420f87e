//! vhost-user-blk backend serving a BlockDevice to QEMU
#![forbid(unsafe_code)]
