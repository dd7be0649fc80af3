//! Protocol frames: binary output frames (encode, decode) and JSON control messages
//! (a heartbeat and an exec, both directions).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use warmpool::protocol::{
    AgentMessage, ExecSpec, HubMessage, Stream, decode_output, encode_output,
};

fn protocol(c: &mut Criterion) {
    let data = vec![b'x'; 4096];
    let mut g = c.benchmark_group("output frame 4 KiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| encode_output(Stream::Stdout, black_box(42), black_box(&data)))
    });
    let frame = encode_output(Stream::Stdout, 42, &data);
    g.bench_function("decode", |b| {
        b.iter(|| decode_output(black_box(&frame)).unwrap().1)
    });
    g.finish();

    let hb = AgentMessage::Heartbeat {
        health: Default::default(),
        answer: false,
    };
    let hb_text = serde_json::to_string(&hb).unwrap();
    c.bench_function("heartbeat to JSON", |b| {
        b.iter(|| serde_json::to_string(black_box(&hb)).unwrap())
    });
    c.bench_function("heartbeat from JSON", |b| {
        b.iter(|| serde_json::from_str::<AgentMessage>(black_box(&hb_text)).unwrap())
    });
    let exec = HubMessage::Exec {
        exec_id: 7,
        spec: ExecSpec {
            script: Some("make test".into()),
            env: [("CI".to_string(), "true".to_string())].into(),
            ..ExecSpec::default()
        },
    };
    let exec_text = serde_json::to_string(&exec).unwrap();
    c.bench_function("exec to JSON", |b| {
        b.iter(|| serde_json::to_string(black_box(&exec)).unwrap())
    });
    c.bench_function("exec from JSON", |b| {
        b.iter(|| serde_json::from_str::<HubMessage>(black_box(&exec_text)).unwrap())
    });
}

criterion_group!(benches, protocol);
criterion_main!(benches);
