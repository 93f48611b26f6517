fn main() {
    println!("ringmail {}", env!("CARGO_PKG_VERSION"));
}
