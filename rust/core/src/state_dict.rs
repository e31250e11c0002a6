//! From an unpickled object graph to a flat list of named tensors, the way `state_dict` keys look:
//! nested dicts (and lists) are joined with `.`. Everything that is not a tensor is skipped but listed,
//! so that a converter can say what it left out (`_metadata`, step counters, config strings, ...).

use std::path::Path;

use crate::error::{Error, Result};
use crate::pickle::{unpickle, Id, Limits, Pickle, TensorSpec, Value};

/// A non-tensor leaf left out of the tensor list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    /// Python type of the value (`int`, `str`, `None`, `dict`, ...).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// Tensors in pickle order.
    pub tensors: Vec<(String, TensorSpec)>,
    pub skipped: Vec<Skipped>,
}

/// Unpickle `data.pkl` and flatten it. The top level must be a dict (or OrderedDict).
pub fn read_state_dict(pkl: &[u8], path: &Path, limits: &Limits) -> Result<StateDict> {
    let pickle = unpickle(pkl, path, limits)?;
    if !matches!(pickle.values[pickle.root], Value::Dict { .. }) {
        return Err(Error::Pickle {
            path: path.to_path_buf(),
            offset: pkl.len(),
            reason: format!(
                "top-level object is a {}, not a dict of tensors",
                pickle.values[pickle.root].kind()
            ),
        });
    }
    let mut walk = Walk {
        pickle: &pickle,
        path,
        limits,
        visits: 0,
        name_bytes: 0,
        out: StateDict::default(),
    };
    walk.walk(pickle.root)?;
    Ok(walk.out)
}

enum Task {
    Visit(Id, String, usize),
    Skip(String, &'static str),
}

struct Walk<'a> {
    pickle: &'a Pickle,
    path: &'a Path,
    limits: &'a Limits,
    visits: usize,
    name_bytes: usize,
    out: StateDict,
}

impl Walk<'_> {
    fn fail(&self, reason: String) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            offset: 0,
            reason,
        }
    }

    /// Depth-first, in pickle order, with an explicit stack: nesting is bounded by `max_depth`, not by
    /// the thread's stack size.
    fn walk(&mut self, root: Id) -> Result<()> {
        let values = &self.pickle.values;
        let mut todo = vec![Task::Visit(root, String::new(), 0)];
        while let Some(task) = todo.pop() {
            let (id, name, depth) = match task {
                Task::Visit(id, name, depth) => (id, name, depth),
                Task::Skip(name, kind) => {
                    self.skip(name, kind);
                    continue;
                }
            };
            // A value shared many times (the memo makes that cheap to write) is walked each time:
            // bound the total, or a few hundred bytes of pickle could describe 2^60 leaves.
            self.visits += 1;
            if self.visits > self.limits.max_visits {
                return Err(self.fail(format!(
                    "more than {} values reached while flattening (shared-reference bomb?)",
                    self.limits.max_visits
                )));
            }
            self.name_bytes += name.len();
            if self.name_bytes > self.limits.max_name_bytes {
                return Err(self.fail(format!(
                    "flattened names exceed {} bytes (shared-reference bomb?)",
                    self.limits.max_name_bytes
                )));
            }
            if depth > self.limits.max_depth {
                return Err(self.fail(format!(
                    "nesting deeper than {} at `{}`",
                    self.limits.max_depth,
                    truncate(&name)
                )));
            }
            let start = todo.len();
            match &values[id] {
                Value::Tensor(t) => self.out.tensors.push((name, t.clone())),
                Value::Dict { items, attrs, .. } if !items.is_empty() || !attrs.is_empty() => {
                    for &(k, v) in items {
                        todo.push(match &values[k] {
                            Value::Str(s) => Task::Visit(v, join(&name, s), depth + 1),
                            Value::Int(i) => Task::Visit(v, join(&name, &i.to_string()), depth + 1),
                            other => Task::Skip(
                                join(&name, &format!("<{} key>", other.kind())),
                                values[v].kind(),
                            ),
                        });
                    }
                    // Attributes such as `_metadata` hold no tensors torch would load into a module.
                    for &(k, v) in attrs {
                        let key = match &values[k] {
                            Value::Str(s) => s.as_str(),
                            _ => "<attribute>",
                        };
                        todo.push(Task::Skip(join(&name, key), values[v].kind()));
                    }
                }
                Value::List(v) | Value::Tuple(v) if !v.is_empty() => {
                    for (i, &item) in v.iter().enumerate() {
                        todo.push(Task::Visit(item, join(&name, &i.to_string()), depth + 1));
                    }
                }
                other => self.skip(name, other.kind()),
            }
            todo[start..].reverse();
        }
        Ok(())
    }

    fn skip(&mut self, name: String, kind: &'static str) {
        self.out.skipped.push(Skipped { name, kind });
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Names in error messages stay readable even when a hostile pickle nests thousands of levels.
fn truncate(name: &str) -> String {
    match name.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &name[..at]),
        None => name.to_owned(),
    }
}
