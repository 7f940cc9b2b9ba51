//! Generates the C header with cbindgen: always into `$OUT_DIR/mupdate.h`, and into
//! `include/mupdate.h` only when `MUPDATE_REGEN_HEADER` is set (a build script that edits the
//! source tree breaks `cargo package`).
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=MUPDATE_REGEN_HEADER");
    let crate_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap_or_default();
    match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            bindings.write_to_file(out.join("mupdate.h"));
            if env::var_os("MUPDATE_REGEN_HEADER").is_some() {
                bindings.write_to_file(crate_dir.join("include/mupdate.h"));
            }
        }
        Err(e) => println!("cargo:warning=cbindgen: {e}"),
    }
}
