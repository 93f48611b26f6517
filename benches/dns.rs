//! DNS codec costs per lookup: encoding a query and decoding typical responses. These run
//! on the shard for every cache miss, so they must stay far below a network round trip.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ringmail::relay::dns::{decode_response, encode_query, DnsCache, Lookup, QueryType, Question};

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("bench name")
}

fn response(id: u16, question: &Question, record_type: RecordType) -> Message {
    let mut message = Message::response(id, OpCode::Query);
    message.metadata.recursion_available = true;
    message.add_query(Query::query(question.name.clone(), record_type));
    message
}

/// An MX answer shaped like a large provider's: five exchanges, compressed names.
fn mx_response_bytes(id: u16, question: &Question) -> Vec<u8> {
    let mut message = response(id, question, RecordType::MX);
    for (preference, host) in [
        (5, "gmail-smtp-in.l.google.com."),
        (10, "alt1.gmail-smtp-in.l.google.com."),
        (20, "alt2.gmail-smtp-in.l.google.com."),
        (30, "alt3.gmail-smtp-in.l.google.com."),
        (40, "alt4.gmail-smtp-in.l.google.com."),
    ] {
        message.add_answer(Record::from_rdata(
            question.name.clone(),
            3600,
            RData::MX(MX::new(preference, name(host))),
        ));
    }
    message.to_vec().expect("encode")
}

fn a_response_bytes(id: u16, question: &Question) -> Vec<u8> {
    let mut message = response(id, question, RecordType::A);
    for last in 1..=4 {
        message.add_answer(Record::from_rdata(
            question.name.clone(),
            300,
            RData::A(A::new(192, 0, 2, last)),
        ));
    }
    message.to_vec().expect("encode")
}

fn nxdomain_bytes(id: u16, question: &Question) -> Vec<u8> {
    let mut message = response(id, question, RecordType::MX);
    message.metadata.response_code = ResponseCode::NXDomain;
    message.add_authority(Record::from_rdata(
        name("test."),
        900,
        RData::SOA(SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86400,
            300,
        )),
    ));
    message.to_vec().expect("encode")
}

fn codec(c: &mut Criterion) {
    let mx_question = Question::new("gmail.com", QueryType::Mx).expect("name");
    let a_question = Question::new("mx.example.test", QueryType::A).expect("name");
    let mut group = c.benchmark_group("dns");
    group.throughput(Throughput::Elements(1));

    group.bench_function("encode_mx_query", |b| {
        b.iter(|| encode_query(black_box(0x1234), black_box(&mx_question)))
    });
    let mx = mx_response_bytes(0x1234, &mx_question);
    group.bench_function("decode_mx_5_records", |b| {
        b.iter(|| decode_response(black_box(&mx), 0x1234, black_box(&mx_question)))
    });
    let a = a_response_bytes(0x4321, &a_question);
    group.bench_function("decode_a_4_records", |b| {
        b.iter(|| decode_response(black_box(&a), 0x4321, black_box(&a_question)))
    });
    let nx = nxdomain_bytes(0x1111, &mx_question);
    group.bench_function("decode_nxdomain_with_soa", |b| {
        b.iter(|| decode_response(black_box(&nx), 0x1111, black_box(&mx_question)))
    });
    group.bench_function("reject_spoofed_id", |b| {
        b.iter(|| decode_response(black_box(&mx), 0x9999, black_box(&mx_question)))
    });

    let mut cache = DnsCache::default();
    let now = std::time::Duration::from_secs(1000);
    for i in 0..4000 {
        let question = Question::new(&format!("d{i}.example.test"), QueryType::Mx).expect("name");
        cache.insert(question, Lookup::NoData, 3600, now);
    }
    let hit = Question::new("d1234.example.test", QueryType::Mx).expect("name");
    group.bench_function("cache_hit_4000_entries", |b| {
        b.iter(|| cache.get(black_box(&hit), now).is_some())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
