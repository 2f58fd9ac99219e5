//! `scorestream compare`: score the same conversations in two numeric formats and report how
//! far apart the rewards are (max/mean |Δ|), whether they rank conversations alike (Spearman
//! rank correlation) and how often two conversations keep their order (pairwise agreement).

use std::io::BufRead;

use anyhow::Context;
use serde::Serialize;

use crate::batch::policy::{pack, BatchLimits};
use crate::cli::CompareArgs;
use crate::engine::Engine;
use crate::event::InputEvent;
use crate::model::ModelOptions;
use crate::prompt::Prompter;

/// Agreement between two score lists over the same conversations.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Agreement {
    pub events: usize,
    pub max_abs_diff: f64,
    pub mean_abs_diff: f64,
    pub spearman: f64,
    pub pairwise_agreement: f64,
}

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let base = args.model.options();
    let ids = tokenize_file(&base, &args.input)?;
    let a = score_all(&ModelOptions { dtype: args.dtype_a, ..base.clone() }, &ids)?;
    let b = score_all(&ModelOptions { dtype: args.dtype_b, ..base }, &ids)?;
    let r = agreement(&a, &b);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{} vs {} over {} conversations", args.dtype_a, args.dtype_b, r.events);
        println!("max |Δreward|       {:.6}", r.max_abs_diff);
        println!("mean |Δreward|      {:.6}", r.mean_abs_diff);
        println!("Spearman ρ          {:.4}", r.spearman);
        println!("pairwise agreement  {:.2} %", 100.0 * r.pairwise_agreement);
    }
    Ok(())
}

/// Template and tokenize every valid event of a JSONL file (invalid ones are skipped with a warning).
pub(crate) fn tokenize_file(opts: &ModelOptions, path: &std::path::Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let prompter = Prompter::load(&opts.path)?;
    let max_tokens = crate::engine::length_limit(opts.max_tokens, &crate::model::ArchConfig::from_dir(&opts.path)?);
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match InputEvent::parse(&line, 0)
            .and_then(|e| prompter.prepare(&e.messages, max_tokens, opts.truncation))
        {
            Ok(p) => out.push(p.ids),
            Err(e) => tracing::warn!(line = n + 1, error = %e, "skipped"),
        }
    }
    Ok(out)
}

/// Rewards of every sequence under `opts`.
pub(crate) fn score_all(opts: &ModelOptions, ids: &[Vec<u32>]) -> anyhow::Result<Vec<f32>> {
    let limits = BatchLimits::default();
    let engine = Engine::start_with_limits(opts, limits)?;
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut rewards = Vec::with_capacity(ids.len());
    for range in pack(&lengths, &limits) {
        let scores = engine.score_blocking(ids[range].to_vec())?;
        rewards.extend(scores.into_iter().map(|s| s.reward));
    }
    Ok(rewards)
}

/// Compare two score lists of equal length.
pub fn agreement(a: &[f32], b: &[f32]) -> Agreement {
    let n = a.len().min(b.len());
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).collect();
    let (mut agree, mut pairs) = (0u64, 0u64);
    for i in 0..n {
        for j in i + 1..n {
            pairs += 1;
            if (a[i] - a[j]).signum() == (b[i] - b[j]).signum() {
                agree += 1;
            }
        }
    }
    Agreement {
        events: n,
        max_abs_diff: diffs.iter().copied().fold(0.0, f64::max),
        mean_abs_diff: if n == 0 { 0.0 } else { diffs.iter().sum::<f64>() / n as f64 },
        spearman: pearson(&ranks(&a[..n]), &ranks(&b[..n])),
        pairwise_agreement: if pairs == 0 { 1.0 } else { agree as f64 / pairs as f64 },
    }
}

/// Ranks with ties given their average rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for &k in &idx[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return 1.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    if vx == 0.0 || vy == 0.0 {
        return if vx == vy { 1.0 } else { 0.0 };
    }
    cov / (vx * vy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_measures() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let same = agreement(&a, &a);
        assert_eq!((same.max_abs_diff, same.spearman, same.pairwise_agreement), (0.0, 1.0, 1.0));
        let swapped = agreement(&a, &[1.0, 3.0, 2.0, 4.0]);
        assert!((swapped.pairwise_agreement - 5.0 / 6.0).abs() < 1e-12);
        assert!((swapped.spearman - 0.8).abs() < 1e-12);
        assert!((swapped.max_abs_diff - 1.0).abs() < 1e-12);
        assert_eq!(agreement(&a, &[4.0, 3.0, 2.0, 1.0]).spearman, -1.0);
    }
}
