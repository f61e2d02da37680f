//! Micro-benchmarks of the hot pure functions: ingest validation, the encoding of a
//! `sensor:readings:batch` payload, and the alert state machine. `cargo bench` (or
//! `cargo bench --bench hot_paths -- validate` for one group). Figures and what they mean are in
//! the README's "Performance" section; nothing here asserts a time.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

use sensorwire::evaluate::thresholds::{self, State, Thresholds};
use sensorwire::ingest::validate;
use sensorwire::wire::{ReadingsBatch, SensorReading, format_time};

const NOW: i64 = 1_800_000_000_000;

/// An ingest body as devices send it: `n` readings over 50 units, optional fields on half.
fn ingest_body(n: usize) -> Value {
    let readings: Vec<Value> = (0..n)
        .map(|i| {
            let mut r = json!({
                "unitId": format!("u-{:04}", i % 50),
                "temperature": 3.5 + (i % 7) as f64 * 0.25,
                "recordedAt": format_time(NOW - 1_000 + i as i64),
                "deviceId": format!("dev-{}", i % 10),
            });
            if i.is_multiple_of(2) {
                r["humidity"] = json!(55.5);
                r["battery"] = json!(88);
            }
            r
        })
        .collect();
    json!({ "readings": readings })
}

fn reading(i: usize) -> SensorReading {
    SensorReading {
        id: (1_000_000 + i).to_string(),
        unit_id: "u-0042".into(),
        device_id: Some(format!("dev-{}", i % 10)),
        temperature: 4.25 + (i % 5) as f64 * 0.1,
        humidity: i.is_multiple_of(2).then_some(55.5),
        battery: None,
        signal_strength: Some(-67.0),
        recorded_at: format_time(NOW + i as i64 * 200),
        source: "api".into(),
    }
}

/// Built through serde so the benchmark does not depend on every field of the struct.
fn batch(n: usize) -> ReadingsBatch {
    let readings: Vec<SensorReading> = (0..n).map(reading).collect();
    serde_json::from_value(json!({ "unitId": "u-0042", "readings": readings, "count": n }))
        .expect("a ReadingsBatch")
}

fn bench_validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    for n in [1usize, 100, 500] {
        let body = ingest_body(n);
        let bytes = serde_json::to_vec(&body).expect("json");
        g.throughput(Throughput::Elements(n as u64));
        // The pure function on a parsed body.
        g.bench_function(format!("validate/{n}"), |b| {
            b.iter(|| validate(black_box(&body), 1000, NOW).expect("valid"))
        });
        // What the handler does per request: parse the bytes, then validate.
        g.bench_function(format!("parse_and_validate/{n}"), |b| {
            b.iter(|| {
                let v: Value = serde_json::from_slice(black_box(&bytes)).expect("json");
                validate(&v, 1000, NOW).expect("valid")
            })
        });
    }
    g.finish();
}

fn bench_batch_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_encoding");
    for n in [5usize, 500] {
        let b5 = batch(n);
        g.throughput(Throughput::Elements(n as u64));
        // What the outbox does once per event: the payload to raw JSON.
        g.bench_function(format!("to_raw_value/{n}"), |b| {
            b.iter(|| serde_json::value::to_raw_value(black_box(&b5)).expect("json"))
        });
        g.bench_function(format!("to_vec/{n}"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&b5)).expect("json"))
        });
        // The fanout's per-flush copy of the buffered readings into the batch.
        let buffered: Vec<SensorReading> = (0..n).map(reading).collect();
        g.bench_function(format!("clone_readings/{n}"), |b| {
            b.iter(|| black_box(&buffered).to_vec())
        });
        let text = serde_json::to_string(&b5).expect("json");
        g.bench_function(format!("decode/{n}"), |b| {
            b.iter(|| serde_json::from_str::<ReadingsBatch>(black_box(&text)).expect("json"))
        });
    }
    g.finish();
}

fn bench_alerts(c: &mut Criterion) {
    let mut g = c.benchmark_group("alerts");
    let range = Thresholds {
        min: Some(0.0),
        max: Some(5.0),
    };
    // The common case: in range, nothing open, nothing changes.
    let (ok, _) = thresholds::on_reading(State::NEW, &range, 3.0);
    g.bench_function("on_reading/steady", |b| {
        b.iter(|| thresholds::on_reading(black_box(ok), black_box(&range), black_box(3.2)))
    });
    // A change: an excursion opens (allocates the change list).
    g.bench_function("on_reading/opens", |b| {
        b.iter(|| thresholds::on_reading(black_box(ok), black_box(&range), black_box(7.5)))
    });
    // A sequence of 1000 readings wandering in and out of range.
    let temps: Vec<f64> = (0..1000)
        .map(|i| ((i * 37) % 120) as f64 / 10.0 - 2.0)
        .collect();
    g.throughput(Throughput::Elements(temps.len() as u64));
    g.bench_function("on_reading/sequence_1000", |b| {
        b.iter(|| {
            let mut s = State::NEW;
            let mut changes = 0;
            for t in &temps {
                let (next, c) = thresholds::on_reading(s, &range, *t);
                changes += c.len();
                s = next;
            }
            (s, changes)
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("on_silence", |b| {
        b.iter(|| thresholds::on_silence(black_box(ok)))
    });
    g.finish();
}

criterion_group!(benches, bench_validate, bench_batch_encoding, bench_alerts);
criterion_main!(benches);
