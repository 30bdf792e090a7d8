//! `wicketd`: the Wicket daemon. All logic lives in the library.

fn main() -> std::process::ExitCode {
    wicketd::cli::main()
}
