//! Builds (or reuses) the template: `cargo run -p fv-guest-template --example ensure [DIR] [cloud|generic]`.
fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(fv_guest_template::default_cache_dir);
    let kernel = match args.next().as_deref() {
        Some("generic") => fv_guest_template::KernelFlavour::Generic,
        _ => fv_guest_template::KernelFlavour::Cloud,
    };
    let t0 = std::time::Instant::now();
    match fv_guest_template::ensure_with_status(&dir, &fv_guest_template::Options { kernel }) {
        Ok((t, s)) => println!("{s:?} in {:.1}s: {t:#?}", t0.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
