//! A seeded generator of hostile inputs, shared by `examples/stress.rs` and
//! `tests/hostile_input.rs`: good events mixed with random bytes, cut JSON, wrong types in every
//! field, lone surrogates, NUL bytes, unknown roles, empty and huge contents, 10,000-message
//! conversations, deep nesting, the ~750 KB poison pill, corrupted bytes and 30-digit numbers.

use serde_json::{json, Value};

/// xorshift64*: reproducible inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The generator's seed for the figures in RELIABILITY.md.
pub const SEED: u64 = 0x5eed_1234_abcd_0001;

/// One conversation event `f{i}` whose assistant turn's content is the JSON text `content`.
fn conv(i: usize, content: &str) -> String {
    format!(r#"{{"id":"f{i}","messages":[{{"role":"user","content":"2+2"}},{{"role":"assistant","content":{content}}}]}}"#)
}

/// A good event with one field replaced by a value of the wrong type.
fn wrong_type(rng: &mut Rng, good: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_str(good).unwrap_or_else(|_| json!({}));
    let bad = [json!(7), json!(null), json!([1, 2]), json!({"a": 1}), json!(true), json!("s"), json!(-0.5)];
    let value = bad[rng.below(bad.len())].clone();
    match rng.below(6) {
        0 => v["id"] = value,
        1 => v["messages"] = value,
        2 => v["messages"][0] = value,
        3 => v["messages"][0]["role"] = value,
        4 => v["messages"][1]["content"] = value,
        _ => v["metadata"] = value,
    }
    v.to_string().into_bytes()
}

/// A conversation of `turns` messages (user and assistant in turn).
fn long_conversation(i: usize, turns: usize) -> Vec<u8> {
    let messages: Vec<Value> = (0..turns)
        .map(|t| if t % 2 == 0 { json!({"role": "user", "content": "2+2"}) } else { json!({"role": "assistant", "content": "4"}) })
        .collect();
    json!({"id": format!("f{i}"), "messages": messages}).to_string().into_bytes()
}

/// One payload for input `i`: `good` (a valid event line) as it is, or a broken one. About 60 %
/// are good; each huge kind (1 MB content, 10,000 messages, deep nesting, the poison pill) is
/// 1 in 64.
pub fn fuzzed(rng: &mut Rng, good: &str, i: usize) -> Vec<u8> {
    match rng.below(64) {
        0..=37 => good.as_bytes().to_vec(),
        38 | 39 => (0..rng.below(300) + 1).map(|_| rng.next() as u8).collect(),
        40 | 41 => good.as_bytes()[..rng.below(good.len())].to_vec(),
        42..=45 => wrong_type(rng, good),
        46 => conv(i, r#""4 \ud800 lone high""#).into_bytes(),
        47 => {
            let mut b = conv(i, r#""4 X""#).into_bytes();
            let at = b.len() - 5;
            b.splice(at..at + 1, [0xed, 0xb0, 0x80]); // a lone low surrogate encoded as UTF-8
            b
        }
        48 => conv(i, r#""4\u0000\u0000""#).into_bytes(),
        49 => {
            let mut b = conv(i, r#""4 X""#).into_bytes();
            let at = b.len() - 5;
            b[at] = 0; // a raw NUL byte inside the string
            b
        }
        50 | 51 => good.replacen("\"assistant\"", "\"robot\"", 1).into_bytes(),
        52 => conv(i, r#""""#).into_bytes(),
        53 => format!(r#"{{"id":"f{i}","messages":[]}}"#).into_bytes(),
        54 => format!("{}{}", "[".repeat(rng.below(200_000)), "]".repeat(10)).into_bytes(),
        55 => conv(i, &Value::String("x".repeat(1_000_000)).to_string()).into_bytes(),
        56 => long_conversation(i, 10_000),
        57 => conv(i, &Value::String("9\"".repeat(250_000)).to_string()).into_bytes(),
        58..=60 => {
            let mut b = good.as_bytes().to_vec();
            for _ in 0..3 {
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
            }
            b
        }
        _ => conv(i, r#""4", "metadata": {"n": 123456789012345678901234567890, "z": -0}"#).into_bytes(),
    }
}

/// `n` fuzzed payloads from `good` event lines (cycled), seeded with [`SEED`].
pub fn payloads(good: &[String], n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(SEED);
    (0..n).map(|i| fuzzed(&mut rng, &good[i % good.len()], i)).collect()
}
