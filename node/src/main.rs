//! `mode-node`: see `mode-node --help`.

fn main() -> std::process::ExitCode {
    mode::daemon::main_with_args(std::env::args_os())
}
