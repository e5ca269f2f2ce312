//! The `flexprefill` command (skeleton; commands land in the next commits).

fn main() {
    println!("flexprefill: work in progress");
}
