//! Builds dirtylog's own Multiboot v1 test kernels (`kernels/*.S`) into `OUT_DIR` with the
//! system's GNU toolchain: `gcc -m32 -c` (the C preprocessor and `as --32`; no 32-bit C
//! library is needed) and `ld -m elf_i386 -T kernels/link.ld`. `src/kernels.rs` embeds the
//! resulting ELF files. `DIRTYLOG_KERNEL_CC` and `DIRTYLOG_KERNEL_LD` override the tools.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The kernels to build: `kernels/NAME.S` becomes `OUT_DIR/NAME.elf`.
const KERNELS: &[&str] = &["info", "echo", "smp", "memtest", "spin", "halt"];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("kernels");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("DIRTYLOG_KERNEL_CC").unwrap_or_else(|_| "gcc".to_owned());
    let ld = env::var("DIRTYLOG_KERNEL_LD").unwrap_or_else(|_| "ld".to_owned());

    println!("cargo:rerun-if-env-changed=DIRTYLOG_KERNEL_CC");
    println!("cargo:rerun-if-env-changed=DIRTYLOG_KERNEL_LD");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.join("lib.inc").display());
    println!("cargo:rerun-if-changed={}", src.join("link.ld").display());

    for name in KERNELS {
        let source = src.join(format!("{name}.S"));
        let object = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        println!("cargo:rerun-if-changed={}", source.display());
        run(
            &cc,
            Command::new(&cc)
                .args(["-m32", "-c", "-nostdinc", "-Wa,--fatal-warnings", "-I"])
                .arg(&src)
                .arg("-o")
                .arg(&object)
                .arg(&source),
        );
        run(
            &ld,
            Command::new(&ld)
                .args(["-m", "elf_i386", "--fatal-warnings", "-T"])
                .arg(src.join("link.ld"))
                .arg("-o")
                .arg(&elf)
                .arg(&object),
        );
    }
}

/// Runs one toolchain step; any failure stops the build with what to install or fix.
fn run(tool: &str, cmd: &mut Command) {
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!(
            "dirtylog-testvm: building the test kernels failed: {cmd:?} exited with {status} \
             (see its messages above; kernels/ are GNU assembler sources)"
        ),
        Err(err) => panic!(
            "dirtylog-testvm: building the test kernels needs `{tool}` ({err}); install the GNU \
             C compiler and binutils (Debian/Ubuntu: `apt-get install gcc binutils`), or set \
             DIRTYLOG_KERNEL_CC / DIRTYLOG_KERNEL_LD to a gcc and an ld that target i386"
        ),
    }
}
