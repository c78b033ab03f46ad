//! Where the `remask` binary under test is (REMASK_BIN, or next to the test
//! executable: target/<profile>/remask), and how to show what it printed.
//! Included with `#[path]` by the e2e test crates.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

/// The `remask` binary under test.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("REMASK_BIN") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "REMASK_BIN={} is not a file",
                path.display()
            );
            return path;
        }
        // This test executable is target/<profile>/deps/<name>-<hash>.
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps/");
        let path = profile_dir.join(format!("remask{}", std::env::consts::EXE_SUFFIX));
        assert!(
            path.is_file(),
            "{} does not exist: run `cargo build --release -p remask-cli` first \
             (`cargo build -p remask-cli` for a debug test run), or set REMASK_BIN",
            path.display()
        );
        path
    })
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything a failed assertion needs to show.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        stdout(out),
        stderr(out)
    )
}
