//! Stop strings (OpenAI's `stop`): the answer ends before the first
//! occurrence of any of them in its text.
//!
//! A diffusion model commits tokens anywhere in the span, so a stop string
//! is looked for only in the answer's final prefix (`Canvas::final_prefix`):
//! text there can no longer change, and once a stop string appears in it
//! the answer is decided and the request finishes at once, however much of
//! the span is still masked (the early stop of a stop token, for text).
//! The scheduler runs the check after every step, as it advances the
//! request.

use remask_model::TextCodec;
use remask_sampler::Canvas;

/// OpenAI's limit on the number of stop strings.
pub const MAX_STOP_STRINGS: usize = 4;
/// Bytes of one stop string at most.
pub const MAX_STOP_BYTES: usize = 1024;

/// A request's stop strings, checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopStrings(Vec<String>);

/// Where the answer ends.
#[derive(Clone, Debug, PartialEq)]
pub struct StopMatch {
    /// Tokens of the final prefix up to and including the stop string (what
    /// `usage.completion_tokens` counts, as vLLM does).
    pub tokens: usize,
    /// The answer's text before the stop string.
    pub text: String,
    /// The stop string that matched (SGLang's `matched_stop`).
    pub matched: String,
}

impl StopStrings {
    /// At most `MAX_STOP_STRINGS` non-empty strings of at most
    /// `MAX_STOP_BYTES` bytes each; the message names what is wrong.
    pub fn new(stop: Vec<String>) -> Result<Self, String> {
        if stop.len() > MAX_STOP_STRINGS {
            return Err(format!(
                "stop has {} strings: at most {MAX_STOP_STRINGS} are accepted",
                stop.len()
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(format!(
                "a stop string is {} bytes: at most {MAX_STOP_BYTES} are accepted",
                s.len()
            ));
        }
        Ok(StopStrings(stop))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first stop string in the text of `final_prefix` (the earliest
    /// start; at one start, the first of the list), with the tokens it takes.
    pub fn find(&self, codec: &TextCodec, final_prefix: &[u32]) -> Option<StopMatch> {
        if self.0.is_empty() {
            return None;
        }
        let text = codec.decode(final_prefix, true).ok()?;
        let (at, matched) = self
            .0
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|&(i, _)| i)?;
        let end = at + matched.len();
        // The fewest tokens whose text holds the whole match: decoding a
        // prefix gives a prefix of the text (an unfinished character aside),
        // so the property is monotone in the number of tokens.
        let covers = |n: usize| {
            codec
                .decode(&final_prefix[..n], true)
                .is_ok_and(|t| t.len() >= end && t.is_char_boundary(end) && t[..end] == text[..end])
        };
        let (mut lo, mut hi) = (1, final_prefix.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if covers(mid) { hi = mid } else { lo = mid + 1 }
        }
        Some(StopMatch {
            tokens: hi,
            text: text[..at].to_string(),
            matched: matched.clone(),
        })
    }

    /// After a step of `canvas`: when its final prefix grew past `checked`
    /// tokens, looks for a stop string there and, on a match, ends the
    /// canvas's answer at it (the request is then done). The one check of
    /// the scheduler and of `remask generate`.
    pub fn check(
        &self,
        codec: &TextCodec,
        canvas: &mut Canvas,
        checked: &mut usize,
    ) -> Option<StopMatch> {
        if self.0.is_empty() {
            return None;
        }
        let prefix = canvas.final_prefix();
        if prefix.len() == *checked {
            return None;
        }
        *checked = prefix.len();
        let m = self.find(codec, prefix)?;
        canvas.end_answer(m.tokens);
        Some(m)
    }

    /// What a stream may send of `text` (the final prefix's text) while no
    /// stop string has matched: all but the last characters that could
    /// still be the start of one (vLLM holds back the same).
    pub fn sendable<'a>(&self, text: &'a str) -> &'a str {
        let hold = self.0.iter().map(|s| s.chars().count()).max().unwrap_or(1) - 1;
        if hold == 0 {
            return text;
        }
        match text.char_indices().rev().nth(hold - 1) {
            Some((i, _)) => &text[..i],
            None => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_openai_refuses() {
        assert!(
            StopStrings::new(vec!["a".into(); 5])
                .unwrap_err()
                .contains("at most 4")
        );
        assert!(StopStrings::new(vec![String::new()]).is_err());
        assert!(StopStrings::new(vec!["x".repeat(MAX_STOP_BYTES + 1)]).is_err());
        assert!(StopStrings::new(vec!["\n".into(), "END".into()]).is_ok());
    }

    #[test]
    fn finds_the_earliest_stop_and_the_tokens_it_takes() {
        use remask_model::{InitOptions, Preset, init_checkpoint};
        let dir = tempfile::tempdir().unwrap();
        init_checkpoint(
            Preset::get("tiny").unwrap(),
            &InitOptions::default(),
            dir.path(),
        )
        .unwrap();
        let codec = TextCodec::load(dir.path()).unwrap();
        let ids = codec
            .encode_continuation("one two. three four. five")
            .unwrap();
        let stop = StopStrings::new(vec!["four".into(), ". ".into()]).unwrap();
        let m = stop.find(&codec, &ids).unwrap();
        assert_eq!((m.text.as_str(), m.matched.as_str()), ("one two", ". "));
        let covered = codec.decode(&ids[..m.tokens], true).unwrap();
        assert!(covered.starts_with("one two. "), "{covered:?}");
        let fewer = codec.decode(&ids[..m.tokens - 1], true).unwrap();
        assert!(!fewer.starts_with("one two. "), "{fewer:?}");
        assert_eq!(
            StopStrings::new(vec!["six".into()])
                .unwrap()
                .find(&codec, &ids),
            None
        );
        assert_eq!(StopStrings::default().find(&codec, &ids), None);
    }

    #[test]
    fn holds_back_what_could_start_a_stop_string() {
        let s = StopStrings::new(vec!["abc".into(), "\n".into()]).unwrap();
        assert_eq!(s.sendable("hello"), "hel");
        assert_eq!(s.sendable("hé"), "");
        assert_eq!(s.sendable("xyzé!"), "xyz");
        let one = StopStrings::new(vec!["\n".into()]).unwrap();
        assert_eq!(one.sendable("hello"), "hello");
    }
}
