//! walld: the StemeDB write-ahead-log daemon. See `wald::daemon`.

fn main() {
    std::process::exit(wald::daemon::main());
}
