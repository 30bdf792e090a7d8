//! `wicket`: the user's CLI. All logic lives in the library.

fn main() -> std::process::ExitCode {
    wicket::cli::main()
}
