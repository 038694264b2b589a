//! What kind of head each one is: previous-token, duplicate-token, induction, ...
//!
//! ```sh
//! cargo run --release --example head_scores -- [MODEL_DIR] ["prompt"]
//! ```

use gpt2::inspect::scores::head_scores;
use gpt2::inspect::{LayerChoice, Selection, Tokens};
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
                "usage: cargo run --release --example head_scores -- [MODEL_DIR] [\"prompt\"] \
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
    let text = args
        .next()
        .unwrap_or_else(|| "The cat sat on the mat. The cat sat on the mat.".into());

    let loaded = source.load(&LoadOptions::default())?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    // TransformerLens puts <|endoftext|> first; so do we here, for comparable numbers.
    let opts = PromptOptions {
        bos: true,
        ..PromptOptions::default()
    };
    let prompt = Prompt::new(tokenizer, &text, model.config(), opts)?;
    let tokens = Tokens::new(tokenizer, &prompt)?;
    let selection = Selection::new(model.config(), LayerChoice::All, None)?;
    let table = head_scores(model, &tokens, &selection)?;
    print!("{}", table.report(&loaded.name, &tokens));
    Ok(())
}
