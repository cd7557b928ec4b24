//! The `weft` binary: everything lives in the library; errors are printed as one line, with
//! each cause that the message before it does not already carry (weft's own errors carry
//! theirs; a context such as `--listen ADDR` does not).

use std::process::ExitCode;

fn main() -> ExitCode {
    match weft::cli::run() {
        Ok(code) => code,
        Err(e) => {
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
