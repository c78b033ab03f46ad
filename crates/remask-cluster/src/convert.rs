//! Between the wire types of `proto/` and the engine's types.

use remask_engine::{Query, Seq, Shard};
use remask_proto::worker as pb;
use remask_sampler::{
    CacheMode, KvUse, MAX_TOP_LOGPROBS, PredictOptions, Prediction, Remasking, TopK, Truncate,
};

/// A generation setting on the public API's wire; `None` (left to the
/// server's default) is UNSPECIFIED.
pub fn remasking_to_pb(r: Option<Remasking>) -> remask_proto::v1::Remasking {
    use remask_proto::v1::Remasking as W;
    match r {
        None => W::Unspecified,
        Some(Remasking::LowConfidence) => W::LowConfidence,
        Some(Remasking::Random) => W::Random,
    }
}

/// As [`remasking_to_pb`], for the K/V cache mode.
pub fn cache_to_pb(c: Option<CacheMode>) -> remask_proto::v1::CacheMode {
    use remask_proto::v1::CacheMode as W;
    match c {
        None => W::Unspecified,
        Some(CacheMode::None) => W::None,
        Some(CacheMode::Prefix) => W::Prefix,
        Some(CacheMode::Dual) => W::Dual,
    }
}

pub fn shard_to_pb(s: &Shard) -> pb::ShardSpec {
    pb::ShardSpec {
        layer_start: s.layers.start as u32,
        layer_end: s.layers.end as u32,
        embedding: s.embedding,
        head: s.head,
    }
}

pub fn shard_from_pb(s: &pb::ShardSpec) -> Shard {
    Shard {
        layers: s.layer_start as usize..s.layer_end as usize,
        embedding: s.embedding,
        head: s.head,
    }
}

pub fn query_to_pb(q: &Query) -> pb::HeadQuery {
    let o = &q.options;
    pb::HeadQuery {
        cond_base: q.cond_base as u32,
        uncond_base: q.uncond_base.map(|b| b as u32),
        positions: q.positions.iter().map(|&p| p as u32).collect(),
        step: q.step,
        first: q.first as u32,
        options: Some(pb::PredictOptions {
            temperature: o.temperature,
            cfg_scale: o.cfg_scale,
            random_remasking: o.remasking == Remasking::Random,
            seed: o.seed,
            logits_eos_inf: o.logits_eos_inf,
            confidence_eos_eot_inf: o.confidence_eos_eot_inf,
            eos: o.eos,
            eot: o.eot,
            mask: o.mask,
            top_logprobs: o.top_logprobs as u32,
            top_k: o.truncate.top_k,
            top_p: (o.truncate.top_p < 1.0).then_some(o.truncate.top_p),
        }),
    }
}

/// Refuses what the sampler could not run (a temperature that is not a
/// finite number >= 0, a top_p outside (0, 1]).
pub fn query_from_pb(q: &pb::HeadQuery) -> Result<Query, String> {
    let o = q.options.unwrap_or_default();
    if !(o.temperature.is_finite() && o.temperature >= 0.0) {
        return Err(format!(
            "temperature must be a finite number >= 0, got {}",
            o.temperature
        ));
    }
    let top_p = o.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("top_p must be in (0, 1], got {top_p}"));
    }
    Ok(Query {
        cond_base: q.cond_base as usize,
        uncond_base: q.uncond_base.map(|b| b as usize),
        first: q.first as usize,
        positions: q.positions.iter().map(|&p| p as usize).collect(),
        step: q.step,
        options: PredictOptions {
            temperature: o.temperature,
            cfg_scale: o.cfg_scale,
            remasking: if o.random_remasking {
                Remasking::Random
            } else {
                Remasking::LowConfidence
            },
            seed: o.seed,
            logits_eos_inf: o.logits_eos_inf,
            confidence_eos_eot_inf: o.confidence_eos_eot_inf,
            eos: o.eos,
            eot: o.eot,
            mask: o.mask,
            top_logprobs: o.top_logprobs.min(MAX_TOP_LOGPROBS as u32) as u8,
            truncate: Truncate {
                top_k: o.top_k,
                top_p,
            },
        },
    })
}

pub fn seq_to_pb(s: &Seq) -> pb::Sequence {
    pb::Sequence {
        length: s.len as u32,
        fed_start: s.fed.start as u32,
        fed_end: s.fed.end as u32,
        kv: match s.kv {
            KvUse::None => pb::KvUse::None,
            KvUse::Store => pb::KvUse::Store,
            KvUse::Read => pb::KvUse::Read,
        } as i32,
        cache: s.cache,
    }
}

/// `None` for an unknown `kv`.
pub fn seq_from_pb(s: &pb::Sequence) -> Option<Seq> {
    let kv = match pb::KvUse::try_from(s.kv).ok()? {
        pb::KvUse::None => KvUse::None,
        pb::KvUse::Store => KvUse::Store,
        pb::KvUse::Read => KvUse::Read,
    };
    Some(Seq {
        fed: s.fed_start as usize..s.fed_end as usize,
        len: s.length as usize,
        kv,
        cache: s.cache,
    })
}

/// The trailer naming the stores a worker does not hold.
pub const MISSING_CACHES: &str = "remask-missing-caches";

pub fn predictions_to_pb(p: &[Prediction]) -> pb::Predictions {
    let mut out = pb::Predictions {
        tokens: p.iter().map(|p| p.token).collect(),
        confidences: p.iter().map(|p| p.confidence).collect(),
        entropies: p.iter().map(|p| p.entropy).collect(),
        logprobs: p.iter().map(|p| p.logprob).collect(),
        ..Default::default()
    };
    if p.iter().any(|p| !p.top.is_empty()) {
        for p in p {
            out.top_counts.push(p.top.len() as u32);
            for (t, l) in p.top.iter() {
                out.top_tokens.push(t);
                out.top_logprobs.push(l);
            }
        }
    }
    out
}

/// `None` when the lists do not fit together (the three first of one
/// length, `logprobs` of it or empty, the alternatives as their counts say,
/// at most `MAX_TOP_LOGPROBS` each).
pub fn predictions_from_pb(p: &pb::Predictions) -> Option<Vec<Prediction>> {
    let n = p.tokens.len();
    let fits = p.confidences.len() == n
        && p.entropies.len() == n
        && (p.logprobs.is_empty() || p.logprobs.len() == n)
        && (p.top_counts.is_empty() || p.top_counts.len() == n)
        && p.top_counts.iter().all(|&c| c as usize <= MAX_TOP_LOGPROBS)
        && p.top_counts.iter().map(|&c| c as usize).sum::<usize>() == p.top_tokens.len()
        && p.top_tokens.len() == p.top_logprobs.len();
    if !fits {
        return None;
    }
    let mut at = 0;
    Some(
        (0..n)
            .map(|i| {
                let mut top = TopK::default();
                let count = p.top_counts.get(i).map_or(0, |&c| c as usize);
                for j in at..at + count {
                    top.insert(count, p.top_tokens[j], p.top_logprobs[j]);
                }
                at += count;
                Prediction {
                    token: p.tokens[i],
                    confidence: p.confidences[i],
                    entropy: p.entropies[i],
                    logprob: p.logprobs.get(i).copied().unwrap_or(f64::NAN),
                    top,
                }
            })
            .collect(),
    )
}

/// Hidden states travel as little-endian f32 bytes. On little-endian
/// machines (all that remask targets) both directions are one memcpy: a step
/// moves megabytes of them.
pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        // SAFETY: any f32 is 4 initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4) }.to_vec()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

pub fn bytes_to_f32(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = vec![0f32; b.len() / 4];
    if cfg!(target_endian = "little") {
        // SAFETY: `out` has exactly b.len() bytes and every bit pattern is an f32.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr().cast::<u8>(), b.len());
        }
    } else {
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Predictions cross the wire whole: logprobs and the alternatives, a
    /// position without any among positions with some; lists that do not
    /// fit together are refused; a worker that sends no logprobs gives NaN.
    #[test]
    fn predictions_round_trip_with_logprobs() {
        let mut top = TopK::default();
        top.insert(3, 7, -0.25);
        top.insert(3, 9, -1.5);
        let p = |token, top| Prediction {
            token,
            confidence: 0.5,
            entropy: 1.25,
            logprob: -0.75,
            top,
        };
        let preds = vec![p(7, top), p(8, TopK::default()), p(9, top)];
        let wire = predictions_to_pb(&preds);
        assert_eq!(wire.top_counts, [2, 0, 2]);
        assert_eq!(predictions_from_pb(&wire).unwrap(), preds);
        // Nobody asked: no alternatives on the wire at all.
        let plain = vec![p(7, TopK::default())];
        let wire_plain = predictions_to_pb(&plain);
        assert!(wire_plain.top_counts.is_empty() && wire_plain.top_tokens.is_empty());
        assert_eq!(predictions_from_pb(&wire_plain).unwrap(), plain);
        let mut bad = wire.clone();
        bad.top_counts[0] = 3;
        assert!(predictions_from_pb(&bad).is_none());
        let mut bad = wire.clone();
        bad.top_counts = vec![6, 0, 0];
        bad.top_tokens = vec![1; 6];
        bad.top_logprobs = vec![-1.0; 6];
        assert!(predictions_from_pb(&bad).is_none(), "more than 5");
        let mut bad = wire.clone();
        bad.logprobs.pop();
        assert!(predictions_from_pb(&bad).is_none());
        let mut old = wire;
        old.logprobs.clear();
        assert!(predictions_from_pb(&old).unwrap()[0].logprob.is_nan());
        // The request's k crosses too.
        let q = Query {
            cond_base: 0,
            uncond_base: None,
            first: 0,
            positions: vec![1],
            step: 0,
            options: PredictOptions {
                temperature: 0.0,
                cfg_scale: 0.0,
                remasking: Remasking::LowConfidence,
                seed: 0,
                logits_eos_inf: false,
                confidence_eos_eot_inf: false,
                eos: 1,
                eot: None,
                mask: 2,
                top_logprobs: 4,
                truncate: Truncate::OFF,
            },
        };
        assert_eq!(query_from_pb(&query_to_pb(&q)).unwrap(), q);
        // So do top-k / top-p; a top_p outside (0, 1] is refused.
        let mut t = q.clone();
        t.options.truncate = Truncate {
            top_k: 40,
            top_p: 0.9,
        };
        assert_eq!(query_from_pb(&query_to_pb(&t)).unwrap(), t);
        for bad in [0.0, -1.0, 1.5, f64::NAN] {
            let mut wire = query_to_pb(&t);
            wire.options.as_mut().unwrap().top_p = Some(bad);
            assert!(query_from_pb(&wire).is_err(), "{bad}");
        }
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let mut wire = query_to_pb(&t);
            wire.options.as_mut().unwrap().temperature = bad;
            assert!(query_from_pb(&wire).is_err(), "{bad}");
        }
    }

    #[test]
    fn hidden_bytes_round_trip() {
        let v = vec![1.5f32, -0.0, f32::MAX, 3.25e-8];
        let b = super::f32_to_bytes(&v);
        assert_eq!(&b[..4], &1.5f32.to_le_bytes());
        assert_eq!(super::bytes_to_f32(&b).unwrap(), v);
        assert!(super::bytes_to_f32(&b[..5]).is_none());
    }
}
