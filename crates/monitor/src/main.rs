//! The container monitor: keeps a container's stdio open, writes its CRI log and
//! records its exit status. It has no async runtime so that it stays small.
//!
//! Only a placeholder until containers land.

fn main() {
    eprintln!("hatoba-monitor: containers are not implemented yet");
    std::process::exit(2);
}
