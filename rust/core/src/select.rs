//! Selecting and renaming tensors by key, on header entries only: no tensor byte is touched.
//!
//! Used to map between PEFT's on-disk keys (`base_model.model.x.lora_A.weight`) and module paths
//! (`x.lora_A.default.weight`), or to pick one adapter out of a file holding several.

use std::collections::HashSet;

use regex::Regex;

use crate::error::{Error, Result};
use crate::reader::TensorEntry;

/// Which keys to keep, and how to rename the kept ones.
#[derive(Debug, Clone, Default)]
pub struct KeySelector {
    prefix: Option<String>,
    pattern: Option<Regex>,
    renames: Vec<(Regex, String)>,
}

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|source| Error::Pattern {
        pattern: pattern.to_owned(),
        source: Box::new(source),
    })
}

impl KeySelector {
    /// Keep keys that start with `prefix` (if given) and match `pattern` anywhere (if given); then apply
    /// each `(regex, replacement)` rename in order, every match replaced (`$1` / `${name}` expand groups).
    pub fn new(
        prefix: Option<String>,
        pattern: Option<&str>,
        renames: &[(String, String)],
    ) -> Result<Self> {
        Ok(Self {
            prefix,
            pattern: pattern.map(compile).transpose()?,
            renames: renames
                .iter()
                .map(|(p, r)| Ok((compile(p)?, r.clone())))
                .collect::<Result<_>>()?,
        })
    }

    pub fn matches(&self, key: &str) -> bool {
        self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
            && self.pattern.as_ref().is_none_or(|re| re.is_match(key))
    }

    pub fn rename(&self, key: &str) -> String {
        let mut key = key.to_owned();
        for (re, replacement) in &self.renames {
            key = re.replace_all(&key, replacement.as_str()).into_owned();
        }
        key
    }

    /// The selected entries with their new names, in the input order. Two entries renamed to the same
    /// key is an error: silently dropping one would lose a tensor.
    pub fn apply<'a>(&self, entries: &'a [TensorEntry]) -> Result<Vec<(String, &'a TensorEntry)>> {
        let selected = self.apply_names(entries.iter().map(|e| e.name.as_str()))?;
        Ok(selected
            .into_iter()
            .map(|(i, name)| (name, &entries[i]))
            .collect())
    }

    /// The same selection over bare keys (e.g. of a state dict read elsewhere): the index of each
    /// selected key in the input, with its new name.
    pub fn apply_names<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<(usize, String)>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            if !self.matches(key) {
                continue;
            }
            let name = self.rename(key);
            if !seen.insert(name.clone()) {
                return Err(Error::DuplicateName(name));
            }
            out.push((i, name));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;

    fn entries(names: &[&str]) -> Vec<TensorEntry> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| TensorEntry {
                name: (*n).into(),
                dtype: Dtype::F32,
                shape: vec![1],
                start: i * 4,
                end: i * 4 + 4,
            })
            .collect()
    }

    #[test]
    fn peft_keys_to_module_paths() {
        let es = entries(&[
            "base_model.model.l.0.q.lora_A.weight",
            "base_model.model.l.0.q.lora_B.weight",
            "base_model.model.l.0.q.lora_magnitude_vector",
            "base_model.model.score.weight",
        ]);
        let sel = KeySelector::new(
            Some("base_model.model.".into()),
            Some(r"lora_"),
            &[
                (r"^base_model\.model\.".into(), String::new()),
                (
                    r"\.(lora_[AB])\.weight$".into(),
                    ".$1.default.weight".into(),
                ),
            ],
        )
        .unwrap();
        let got: Vec<_> = sel
            .apply(&es)
            .unwrap()
            .into_iter()
            .map(|(n, e)| (n, e.start))
            .collect();
        assert_eq!(
            got,
            [
                ("l.0.q.lora_A.default.weight".to_string(), 0),
                ("l.0.q.lora_B.default.weight".to_string(), 4),
                ("l.0.q.lora_magnitude_vector".to_string(), 8),
            ]
        );
    }

    #[test]
    fn rename_collision_is_an_error_naming_the_key() {
        let es = entries(&["a.x", "b.x"]);
        let sel = KeySelector::new(None, None, &[(r"^[ab]\.".into(), String::new())]).unwrap();
        let err = sel.apply(&es).unwrap_err().to_string();
        assert!(err.contains("`x`"), "{err}");
    }

    #[test]
    fn bad_pattern_is_reported() {
        let err = KeySelector::new(None, Some("("), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid key pattern `(`"), "{err}");
    }

    #[test]
    fn bare_keys_are_selected_like_entries() {
        let sel =
            KeySelector::new(Some("p.".into()), None, &[(r"^p\.".into(), String::new())]).unwrap();
        let got = sel.apply_names(["p.a", "q.b", "p.c"]).unwrap();
        assert_eq!(got, [(0, "a".to_string()), (2, "c".to_string())]);
        assert!(sel.apply_names(["p.a", "p.a"]).is_err());
    }

    #[test]
    fn no_filters_keeps_everything() {
        let es = entries(&["a", "b"]);
        assert_eq!(KeySelector::default().apply(&es).unwrap().len(), 2);
    }
}
