//! Shared-prefix scoring is exact: sequences that begin with the same tokens, packed as one tree
//! (the prefix computed once), score as each would alone, on every committed fixture (GQA,
//! sliding window, partial rotary, FP8 checkpoint), in any batch order and across stages.

mod common_fixtures;

use common_fixtures::{fixture_names, Reference};
use scorestream::engine::Engine;
use scorestream::event::Score;
use scorestream::model::ModelOptions;

fn engine(name: &str, devices: &[&str], min_shared: usize) -> Engine {
    let mut opts = ModelOptions::new(common_fixtures::dir(name));
    opts.devices = devices.iter().map(|d| d.to_string()).collect();
    Engine::start(&opts).unwrap_or_else(|e| panic!("{name}: {e}")).with_min_shared_prefix(min_shared)
}

fn pad_token(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(common_fixtures::dir(name).join("config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["pad_token_id"].as_u64().map(|p| p as u32)
}

/// Members sharing a prefix of about 5/8 of the model's positions (past one 512-query chunk on
/// the larger fixtures, past the sliding window everywhere): suffixes of several lengths, one
/// empty (the member is the prefix), one of padding only; then unrelated events.
fn batch(name: &str, limit: usize) -> (Vec<Vec<u32>>, usize) {
    let events = Reference::load(name).events;
    let target = limit * 5 / 8;
    let prefix: Vec<u32> = events.iter().flat_map(|e| e.input_ids.iter().copied()).take(target).collect();
    let room = limit - prefix.len();
    let mut seqs: Vec<Vec<u32>> = events
        .iter()
        .take(6)
        .map(|e| prefix.iter().chain(&e.input_ids[..e.input_ids.len().min(room)]).copied().collect())
        .collect();
    seqs.push(prefix.clone());
    if let Some(pad) = pad_token(name) {
        seqs.push(prefix.iter().copied().chain([pad, pad]).collect());
    }
    let members = seqs.len();
    seqs.extend(events.iter().skip(6).take(4).map(|e| e.input_ids.clone()));
    (seqs, members)
}

fn close(a: &Score, b: &Score) -> bool {
    let near = |x: f32, y: f32| (x - y).abs() <= 1e-5 * y.abs().max(1.0);
    near(a.reward, b.reward) && a.attributes.iter().zip(&b.attributes).all(|((_, x), (_, y))| near(*x, *y))
}

#[test]
fn shared_prefix_rewards_equal_each_sequence_scored_alone_on_every_fixture() {
    let names = fixture_names();
    assert!(names.len() >= 7, "expected the committed fixtures, found {names:?}");
    for name in names {
        let plain = engine(&name, &["cpu"], 0);
        let (seqs, members) = batch(&name, plain.info().max_position_embeddings);
        let alone: Vec<Score> = seqs.iter().map(|s| plain.score_blocking(vec![s.clone()]).unwrap().remove(0)).collect();
        for devices in [&["cpu"][..], &["cpu", "cpu"][..]] {
            let shared = engine(&name, devices, 8);
            assert!(shared.shares_prefixes());
            let together = shared.score_blocking(seqs.clone()).unwrap();
            let mut rev = seqs.clone();
            rev.reverse();
            let reversed = shared.score_blocking(rev).unwrap();
            // Each batch computes the prefix (`seqs[6]`) once instead of once per member (the
            // unrelated events may share their template's first tokens too).
            let saved = shared.prefix_tokens_shared();
            assert!(saved >= 2 * ((members - 1) * seqs[6].len()) as u64, "{name} {devices:?}: {saved} tokens shared");
            for (i, want) in alone.iter().enumerate() {
                for (how, got) in [("in order", &together[i]), ("reversed", &reversed[seqs.len() - 1 - i])] {
                    assert!(close(got, want), "{name} {devices:?} sequence {i} {how}: {got:?} shared vs {want:?} alone");
                }
            }
        }
    }
}

#[test]
fn an_engine_without_the_setting_does_not_share() {
    let e = engine("arith", &["cpu"], 0);
    assert!(!e.shares_prefixes());
    e.score_blocking(vec![vec![1; 40], vec![1; 40]]).unwrap();
    assert_eq!(e.prefix_tokens_shared(), 0);
}
