fn main() { println!("loadgen: usage: loadgen smtp|pop3|sink|dns ..."); }
