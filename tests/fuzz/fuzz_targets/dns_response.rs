//! Fuzz the DNS response decoder: any bytes must give an answer or an error, never a panic
//! or an unbounded allocation. The first two bytes double as the expected id so that the
//! fuzzer reaches past the id check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmail::relay::dns::{decode_response, QueryType, Question};

fuzz_target!(|data: &[u8]| {
    let id = match data {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        _ => 0,
    };
    for query_type in [QueryType::Mx, QueryType::A, QueryType::Aaaa] {
        let question = Question::new("example.test", query_type).expect("valid name");
        let _ = decode_response(data, id, &question);
    }
});
