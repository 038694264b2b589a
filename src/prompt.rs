//! A prompt as a model sees it: token ids, checked against the model once, here, for every command
//! (the vocabulary, the context length, `<|endoftext|>` in front, truncation).

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tokenizer::{Tokenizer, END_OF_TEXT};

/// How to turn a text into a [`Prompt`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// Put `<|endoftext|>` first, as TransformerLens does (transformers adds nothing).
    pub bos: bool,
    /// Keep the last `n_positions` tokens of a longer prompt instead of failing.
    pub truncate: bool,
    /// An empty prompt is `<|endoftext|>` alone (what generation starts from), not an error.
    pub empty_is_bos: bool,
}

/// Token ids of a prompt, at least one and at most the model's `n_positions`, all inside its
/// vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The first id is an `<|endoftext|>` put in front (`bos`, or an empty prompt).
    pub bos: bool,
    /// Tokens cut from the front to fit the context (with [`PromptOptions::truncate`]).
    pub dropped: usize,
}

impl Prompt {
    /// Tokenises `text` for a model of `config`.
    pub fn new(
        tokenizer: &Tokenizer,
        text: &str,
        config: &Config,
        opts: PromptOptions,
    ) -> Result<Self> {
        let mut ids = tokenizer.encode(text)?;
        let bos = opts.bos || (ids.is_empty() && opts.empty_is_bos);
        if bos {
            let id = tokenizer
                .token_to_id(END_OF_TEXT)
                .unwrap_or(config.bos_token_id);
            ids.insert(0, id);
        }
        let mut dropped = 0;
        if opts.truncate && ids.len() > config.n_positions {
            dropped = ids.len() - config.n_positions;
            ids.drain(..dropped);
        }
        let mut prompt = Self::from_ids(ids, config)?;
        prompt.bos = bos && dropped == 0;
        prompt.dropped = dropped;
        Ok(prompt)
    }

    /// Ids as they are, checked against a model of `config`.
    pub fn from_ids(ids: Vec<u32>, config: &Config) -> Result<Self> {
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                config.vocab_size
            )));
        }
        if ids.len() > config.n_positions {
            return Err(Error::PromptTooLong {
                tokens: ids.len(),
                context: config.n_positions,
            });
        }
        Ok(Self {
            ids,
            bos: false,
            dropped: 0,
        })
    }

    /// Number of tokens, `T`.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false: a prompt has at least one token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The text of each token on its own (TransformerLens' `to_str_tokens`).
    pub fn token_texts(&self, tokenizer: &Tokenizer) -> Result<Vec<String>> {
        self.ids.iter().map(|&id| tokenizer.decode(&[id])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            vocab_size: 300,
            n_positions: 8,
            bos_token_id: 299,
            eos_token_id: 299,
            ..Config::default()
        }
    }

    #[test]
    fn checks_bos_and_truncation() -> Result<()> {
        let tok = Tokenizer::bytes_only(299)?;
        let c = config();
        let p = Prompt::new(&tok, "abc", &c, PromptOptions::default())?;
        assert_eq!((p.len(), p.bos, p.dropped), (3, false, 0));
        let p = Prompt::new(
            &tok,
            "abc",
            &c,
            PromptOptions {
                bos: true,
                ..Default::default()
            },
        )?;
        assert_eq!((p.ids[0], p.len(), p.bos), (299, 4, true));
        let long = "abcdefghijk";
        let err = Prompt::new(&tok, long, &c, PromptOptions::default()).err();
        assert!(matches!(
            err,
            Some(Error::PromptTooLong {
                tokens: 11,
                context: 8
            })
        ));
        let p = Prompt::new(
            &tok,
            long,
            &c,
            PromptOptions {
                truncate: true,
                ..Default::default()
            },
        )?;
        assert_eq!((p.len(), p.dropped), (8, 3));
        assert_eq!(tok.decode(&p.ids)?, "defghijk");
        Ok(())
    }

    #[test]
    fn empty_prompts_are_an_error_or_bos() -> Result<()> {
        let tok = Tokenizer::bytes_only(299)?;
        let err = Prompt::new(&tok, "", &config(), PromptOptions::default()).err();
        assert!(matches!(err, Some(Error::EmptyPrompt)));
        let opts = PromptOptions {
            empty_is_bos: true,
            ..Default::default()
        };
        let p = Prompt::new(&tok, "", &config(), opts)?;
        assert_eq!((p.ids.as_slice(), p.bos), (&[299][..], true));
        let err = Prompt::from_ids(vec![1, 300], &config()).err();
        assert!(err.is_some_and(|e| e.to_string().contains("vocabulary of 300")));
        Ok(())
    }
}
