//! The IOI dataset of Wang et al. 2022: the paper's 15 templates (its `BABA_TEMPLATES`; ABBA
//! swaps the first two names), places, objects and names, filled by the crate's seeded
//! generator, and the ABC corruption (each of the three name slots a new name, the three
//! distinct and none the prompt's IO or S), so a corrupted prompt keeps every token but the
//! names.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::tokenizer::Tokenizer;

use super::super::patching::{Metric, Pair};

/// The BABA templates of the IOI paper's dataset code; `[B]` is the subject, `[A]` the indirect
/// object, and the prompt stops before the last `[A]` (the answer).
pub const TEMPLATES: [&str; 15] = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
];

/// The paper's places and objects.
pub const PLACES: [&str; 8] = [
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
];
pub const OBJECTS: [&str; 8] = [
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
];

/// The paper's names (its `NAMES`); those that are not one token after a space in the model's
/// tokenizer are dropped ([`single_token_names`]).
pub const NAMES: &[&str] = &[
    "Aaron",
    "Adam",
    "Alan",
    "Alex",
    "Alice",
    "Amy",
    "Anderson",
    "Andre",
    "Andrew",
    "Andy",
    "Anna",
    "Anthony",
    "Arthur",
    "Austin",
    "Blake",
    "Brandon",
    "Brian",
    "Carter",
    "Charles",
    "Charlie",
    "Christian",
    "Christopher",
    "Clark",
    "Cole",
    "Collins",
    "Connor",
    "Crew",
    "Crystal",
    "Daniel",
    "David",
    "Dean",
    "Edward",
    "Elizabeth",
    "Emily",
    "Eric",
    "Eva",
    "Ford",
    "Frank",
    "George",
    "Georgia",
    "Graham",
    "Grant",
    "Henry",
    "Ian",
    "Jack",
    "Jacob",
    "Jake",
    "James",
    "Jamie",
    "Jane",
    "Jason",
    "Jay",
    "Jennifer",
    "Jeremy",
    "Jessica",
    "John",
    "Jonathan",
    "Jordan",
    "Joseph",
    "Joshua",
    "Justin",
    "Kate",
    "Kelly",
    "Kevin",
    "Kyle",
    "Laura",
    "Leon",
    "Lewis",
    "Lisa",
    "Louis",
    "Luke",
    "Madison",
    "Marco",
    "Marcus",
    "Maria",
    "Mark",
    "Martin",
    "Mary",
    "Matthew",
    "Max",
    "Michael",
    "Michelle",
    "Morgan",
    "Patrick",
    "Paul",
    "Peter",
    "Prince",
    "Rachel",
    "Richard",
    "River",
    "Robert",
    "Roman",
    "Rose",
    "Ruby",
    "Russell",
    "Ryan",
    "Sarah",
    "Scott",
    "Sean",
    "Simon",
    "Stephen",
    "Steven",
    "Sullivan",
    "Taylor",
    "Thomas",
    "Tyler",
    "Victoria",
    "Warren",
    "William",
];

/// The order of the names in the first clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// "Then, [A] and [B] ... [B] gave ... to": the IO first.
    Abba,
    /// "Then, [B] and [A] ... [B] gave ... to": the subject first.
    Baba,
    /// Alternating ABBA and BABA, half each (the paper's mixed dataset).
    Mixed,
}

impl Order {
    pub const ALL: [Self; 3] = [Self::Mixed, Self::Abba, Self::Baba];

    pub fn name(self) -> &'static str {
        match self {
            Self::Abba => "abba",
            Self::Baba => "baba",
            Self::Mixed => "mixed",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Self::Mixed => "Half ABBA, half BABA, alternating (the paper's dataset)",
            Self::Abba => "The indirect object named first: \"Then, Mary and John ...\"",
            Self::Baba => "The subject named first: \"Then, John and Mary ...\"",
        }
    }
}

impl std::str::FromStr for Order {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| Error::param("order", format!("`{s}`: expected mixed, abba or baba")))
    }
}

/// One IOI prompt and its ABC corruption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IoiPrompt {
    /// Index into [`TEMPLATES`].
    pub template: usize,
    /// ABBA or BABA.
    pub order: Order,
    /// The indirect object (the answer) and the subject.
    pub io: String,
    pub s: String,
    pub place: String,
    pub object: String,
    /// The prompt, up to the answer ("... gave a drink to").
    pub text: String,
    /// The ABC prompt: the three name slots given three other, distinct names.
    pub corrupted: String,
}

/// `n` prompts from `seed`: template, place, object and two distinct names drawn in that order
/// per prompt, then the three ABC names. `names` (at least 5) are names as they follow a space.
pub fn generate(n: usize, seed: u64, order: Order, names: &[String]) -> Result<Vec<IoiPrompt>> {
    // More prompts than any experiment here runs in a day.
    const MOST: usize = 100_000;
    if n == 0 || n > MOST {
        return Err(Error::param("n", format!("{n}: must be 1 to {MOST}")));
    }
    if names.len() < 5 {
        return Err(Error::param(
            "names",
            format!(
                "has {} usable names: IO, S and the ABC corruption's three others need at least \
                 5 (names must be one token after a space)",
                names.len()
            ),
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let mut pick = |len: usize| rng.below(len as u64) as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let order = match order {
            Order::Mixed if i % 2 == 0 => Order::Abba,
            Order::Mixed => Order::Baba,
            o => o,
        };
        let template = pick(TEMPLATES.len());
        let place = PLACES[pick(PLACES.len())];
        let object = OBJECTS[pick(OBJECTS.len())];
        let distinct = |pick: &mut dyn FnMut(usize) -> usize, taken: &[usize]| loop {
            let k = pick(names.len());
            if !taken.contains(&k) {
                return k;
            }
        };
        let a = distinct(&mut pick, &[]);
        let b = distinct(&mut pick, &[a]);
        // ABC: three names unrelated to the prompt's two.
        let x = distinct(&mut pick, &[a, b]);
        let y = distinct(&mut pick, &[a, b, x]);
        let z = distinct(&mut pick, &[a, b, x, y]);
        let (io, s) = (&names[a], &names[b]);
        // The template without its answer, ABBA swapping the first two names.
        let body = TEMPLATES[template]
            .strip_suffix(" [A]")
            .ok_or_else(|| Error::Internal("an IOI template must end with [A]".into()))?;
        let body = match order {
            Order::Abba => body.replacen("[B] and [A]", "[A] and [B]", 1),
            _ => body.to_string(),
        };
        let body = body.replace("[PLACE]", place).replace("[OBJECT]", object);
        let text = body.replace("[A]", io).replace("[B]", s);
        // ABC: the name slots in order of appearance become x, y, z.
        let mut corrupted = body;
        for k in [x, y, z] {
            let at = [corrupted.find("[A]"), corrupted.find("[B]")]
                .into_iter()
                .flatten()
                .min()
                .ok_or_else(|| Error::Internal("an IOI template has three names".into()))?;
            corrupted.replace_range(at..at + 3, &names[k]);
        }
        out.push(IoiPrompt {
            template,
            order,
            io: io.clone(),
            s: s.clone(),
            place: place.to_string(),
            object: object.to_string(),
            text,
            corrupted,
        });
    }
    Ok(out)
}

/// The names of `names` that are one token after a space in `tokenizer`.
pub fn single_token_names(tokenizer: &Tokenizer, names: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in names {
        if tokenizer.encode(&format!(" {n}"))?.len() == 1 {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// The prompts as patching pairs: clean = IOI, corrupted = ABC, measured by
/// `logit(IO) − logit(S)` at the last position.
pub fn pairs(tokenizer: &Tokenizer, prompts: &[IoiPrompt]) -> Result<Vec<Pair>> {
    let one = |name: &str| -> Result<u32> {
        match tokenizer.encode(&format!(" {name}"))?.as_slice() {
            [id] => Ok(*id),
            ids => Err(Error::param(
                "names",
                format!("\" {name}\" is {} tokens, not one", ids.len()),
            )),
        }
    };
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let clean = tokenizer.encode(&p.text)?;
            let corrupted = tokenizer.encode(&p.corrupted)?;
            if clean.len() != corrupted.len() {
                return Err(Error::param(
                    "names",
                    format!(
                        "prompt {i}: {:?} is {} tokens and its ABC prompt {:?} {}: every name \
                         must be one token after a space",
                        p.text,
                        clean.len(),
                        p.corrupted,
                        corrupted.len()
                    ),
                ));
            }
            Ok(Pair {
                clean,
                corrupted,
                metric: Metric::LogitDiff {
                    target: one(&p.io)?,
                    against: one(&p.s)?,
                },
                label: format!("IOI prompt {i}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_templates_and_abc_renames_every_slot() -> Result<()> {
        let names: Vec<String> = ["Mary", "John", "Tom", "Anna", "Ian", "Sam"]
            .map(String::from)
            .to_vec();
        let p = generate(40, 7, Order::Mixed, &names)?;
        assert_eq!(p, generate(40, 7, Order::Mixed, &names)?, "seeded");
        for (i, q) in p.iter().enumerate() {
            assert_eq!(q.order, if i % 2 == 0 { Order::Abba } else { Order::Baba });
            assert_ne!(q.io, q.s);
            // The answer is not in the prompt's end; S appears twice, IO once.
            assert_eq!(q.text.matches(&q.s).count(), 2, "{}", q.text);
            assert_eq!(q.text.matches(&q.io).count(), 1, "{}", q.text);
            let first = q.text.find(&q.io) < q.text.find(&q.s);
            assert_eq!(first, q.order == Order::Abba, "{}", q.text);
            // ABC: the same words but the names, three distinct ones.
            let words = |t: &str| -> Vec<String> {
                t.split(' ')
                    .map(|w| w.trim_matches([',', '.']).to_string())
                    .collect()
            };
            let (a, b) = (words(&q.text), words(&q.corrupted));
            assert_eq!(a.len(), b.len());
            let renamed: Vec<&String> = b
                .iter()
                .zip(&a)
                .filter(|(x, y)| x != y || names.contains(y))
                .map(|(x, _)| x)
                .collect();
            assert_eq!(renamed.len(), 3, "{} / {}", q.text, q.corrupted);
            assert!(
                renamed[0] != renamed[1] && renamed[1] != renamed[2] && renamed[0] != renamed[2]
            );
            assert!(renamed.iter().all(|n| **n != q.io && **n != q.s));
        }
        assert!(generate(4, 7, Order::Mixed, &names[..4]).is_err());
        Ok(())
    }
}
