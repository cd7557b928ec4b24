//! The `weft` binary: everything lives in the library; errors are printed as one line (weft's
//! errors carry their causes in their own message).

use std::process::ExitCode;

fn main() -> ExitCode {
    match weft::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
