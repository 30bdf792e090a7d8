//! Standard output for the CLI's results. `outln!`/`out!` stand in for
//! `println!`/`print!`: when the reader of a pipe has gone (`wicket audit
//! search | head -1`), the process ends quietly with success, as `rg` and
//! other Unix tools do, instead of the panic `println!` gives (Rust ignores
//! SIGPIPE, so the write fails with `BrokenPipe`).

use std::io::Write;

/// `println!` that ends the process quietly when stdout's reader has gone.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the process quietly when stdout's reader has gone.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// Writes `args` to stdout. A closed pipe ends the process with success;
/// another error is reported on stderr and ends it with failure.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        quit_on(&e);
    }
}

/// Flushes stdout, as [`write`] writes.
pub fn flush() {
    if let Err(e) = std::io::stdout().lock().flush() {
        quit_on(&e);
    }
}

fn quit_on(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("wicket: error: writing to stdout: {e}");
    std::process::exit(1);
}
