//! Generate text, streamed as it is produced.
//!
//! ```sh
//! cargo run --release --example generate -- [MODEL_DIR] ["prompt"]
//! ```
//! Without a folder, GPT-2 small comes from the Hugging Face Hub (or its cache).

use std::io::Write;

use gpt2::generation::{generate, GenerateParams, SamplingParams};
use gpt2::prompt::{Prompt, PromptOptions};
use gpt2::{Error, LoadOptions, ModelSource};

/// An error as a sentence (a `main` returning `Result` prints its `Debug` form), and how to
/// call this example.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "usage: cargo run --release --example generate -- [MODEL_DIR] [\"prompt\"] \
                 (without MODEL_DIR, GPT-2 small from the Hub)"
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let source = args
        .next()
        .map_or_else(|| ModelSource::hub("gpt2", "main"), ModelSource::dir);
    let text = args.next().unwrap_or_else(|| "The cat sat on the".into());

    let loaded = source.load(&LoadOptions::default())?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let prompt = Prompt::new(tokenizer, &text, model.config(), PromptOptions::default())?;
    let params = GenerateParams {
        max_new_tokens: 40,
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: Some(50),
            ..SamplingParams::default()
        },
        ..GenerateParams::default()
    };

    print!("{text}");
    let (completions, timings) = generate(model, tokenizer, &prompt, &params, |_, piece| {
        print!("{piece}");
        std::io::stdout()
            .flush()
            .map_err(|e| Error::io("<stdout>", e))
    })?;
    println!();
    eprintln!(
        "{} tokens ({}), decode {:.1} tokens/s",
        completions[0].token_ids.len(),
        completions[0].finish_reason.as_str(),
        timings.decode_tokens_per_s().unwrap_or(0.0)
    );
    Ok(())
}
