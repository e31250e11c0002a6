//! A restricted unpickler for torch's `data.pkl`: the opcode set of `torch.load(weights_only=True)` and
//! nothing more, run symbolically. GLOBALs are looked up in [`crate::pickle_globals`] and recorded, never
//! resolved; the few allowlisted calls a state dict needs (`_rebuild_tensor_v2`, `OrderedDict()`, ...)
//! are interpreted here, any other call is refused.
//!
//! Values live in an arena and are referred to by index, so the memo, the stack and containers share
//! values the way Python shares references: a memo fetch copies an index, never a value, and dropping
//! the arena never recurses. Every growth is checked against [`Limits`] before it happens, and every
//! length read from the input is checked against the bytes that are left.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pickle_globals::{classify, Global, Rebuild};
use crate::torch_dtype::TorchDtype;

/// Bounds on what a pickle may make the reader allocate or walk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Nested MARKs at once, and container nesting when the result is walked.
    pub max_depth: usize,
    /// Values in the arena (every pushed scalar, container, tensor).
    pub max_values: usize,
    /// Memo entries.
    pub max_memo: usize,
    /// Items appended to lists and dicts, in total.
    pub max_items: usize,
    /// Container visits while flattening (a value shared N times is visited N times).
    pub max_visits: usize,
    /// Bytes of flattened names, in total (names grow with depth, and sharing multiplies them).
    pub max_name_bytes: usize,
    /// Bytes a converter may allocate for non-contiguous views beyond the checkpoint's own size:
    /// expanded (stride 0) views repeat storage elements, so a few input bytes can describe terabytes.
    pub max_expanded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 1_000,
            max_values: 1 << 26,
            max_memo: 1 << 24,
            max_items: 1 << 26,
            max_visits: 1 << 22,
            max_name_bytes: 64 << 20,
            max_expanded_bytes: 1 << 30,
        }
    }
}

pub type Id = usize;

/// `cpu`, `cuda:0`, `mps`, `xpu:1`...: a device type (lowercase letters, digits, `_`, starting with a
/// letter) with an optional `:index`.
fn is_device_location(location: &str) -> bool {
    let (kind, index) = match location.split_once(':') {
        Some((k, i)) => (k, Some(i)),
        None => (location, None),
    };
    let kind_ok = kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let index_ok = index.is_none_or(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()));
    kind_ok && index_ok
}

/// A persistent id `('storage', storage_type, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    /// `None` for `UntypedStorage`, whose `numel` counts bytes.
    pub dtype: Option<TorchDtype>,
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_*` describes it: a strided view of a storage, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub storage_key: String,
    pub storage_dtype: Option<TorchDtype>,
    pub storage_numel: u64,
    pub dtype: TorchDtype,
    pub storage_offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    pub requires_grad: bool,
}

#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    /// A non-tensor value we never look into (bytes, big ints, `torch.device(...)`, sets, ...).
    Opaque(&'static str),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Items in insertion order; `attrs` holds an OrderedDict's `__dict__` (e.g. `_metadata`).
    Dict {
        items: Vec<(Id, Id)>,
        index: HashMap<Key, usize>,
        attrs: Vec<(Id, Id)>,
    },
    Global(Global, String),
    Storage(StorageRef),
    Tensor(TensorSpec),
}

/// Hashable dict keys: Python replaces the value of an existing key in place, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Str(String),
    Int(i64),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Opaque(k) => k,
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict { .. } => "dict",
            Value::Global(..) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// The unpickled object graph: `root` indexes into `values`.
#[derive(Debug)]
pub struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
}

/// Run `data` (a whole `data.pkl`) and return its object graph. `path` only names the file in errors.
pub fn unpickle(data: &[u8], path: &Path, limits: &Limits) -> Result<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        path,
        limits: *limits,
        values: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        items: 0,
    };
    let root = m.run()?;
    Ok(Pickle {
        values: m.values,
        root,
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for error messages.
    op_at: usize,
    path: &'a Path,
    limits: Limits,
    values: Vec<Value>,
    stack: Vec<Id>,
    marks: Vec<Vec<Id>>,
    memo: HashMap<u32, Id>,
    items: usize,
}

impl<'a> Machine<'a> {
    fn malformed(&self, reason: impl Into<String>) -> Error {
        Error::Pickle {
            path: self.path.to_path_buf(),
            offset: self.op_at,
            reason: reason.into(),
        }
    }

    fn refused(&self, what: impl Into<String>) -> Error {
        Error::UnsafePickle {
            path: self.path.to_path_buf(),
            offset: self.op_at,
            what: what.into(),
        }
    }

    fn read(&mut self, n: usize) -> Result<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(self.malformed(format!(
                "truncated: {} needs {n} bytes, {left} left",
                opcode_name(self.data[self.op_at])
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn read_u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.read(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn readline(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("GLOBAL without a newline-terminated name"))?;
        let line = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.malformed("GLOBAL name is not UTF-8"))?
            .to_owned();
        self.pos += n + 1;
        Ok(line)
    }

    fn alloc(&mut self, v: Value) -> Result<Id> {
        if self.values.len() >= self.limits.max_values {
            return Err(self.malformed(format!("more than {} values", self.limits.max_values)));
        }
        self.values.push(v);
        Ok(self.values.len() - 1)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        let id = self.alloc(v)?;
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self) -> Result<Id> {
        self.stack.pop().ok_or_else(|| {
            self.malformed(format!(
                "stack underflow in {}",
                opcode_name(self.data[self.op_at])
            ))
        })
    }

    fn top(&self) -> Result<Id> {
        self.stack.last().copied().ok_or_else(|| {
            self.malformed(format!(
                "stack underflow in {}",
                opcode_name(self.data[self.op_at])
            ))
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let below = self.marks.pop().ok_or_else(|| {
            self.malformed(format!(
                "{} without a MARK",
                opcode_name(self.data[self.op_at])
            ))
        })?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn count_items(&mut self, n: usize) -> Result<()> {
        self.items += n;
        if self.items > self.limits.max_items {
            return Err(self.malformed(format!(
                "more than {} container items",
                self.limits.max_items
            )));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(self.malformed("truncated: no STOP opcode"));
            };
            self.pos += 1;
            match op {
                0x80 => {
                    self.read(1)?; // PROTO: torch writes 2; later protocols only add opcodes we refuse.
                }
                b'.' => {
                    // STOP
                    let root = self.pop()?;
                    return Ok(root);
                }
                b'c' => self.global()?,
                b'R' => self.reduce()?,
                0x81 => self.newobj()?,
                b'b' => self.build()?,
                b'Q' => self.persistent_id()?,
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.count_items(1)?;
                    self.list_mut(list, "APPEND")?.push(item);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.count_items(items.len())?;
                    self.list_mut(list, "APPENDS")?.extend(items);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, &[k, v])?;
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    if kv.len() % 2 != 0 {
                        return Err(self.malformed("SETITEMS with an odd number of items"));
                    }
                    let dict = self.top()?;
                    self.set_items(dict, &kv)?;
                }
                b'(' => {
                    if self.marks.len() >= self.limits.max_depth {
                        return Err(self.malformed(format!(
                            "more than {} nested MARKs",
                            self.limits.max_depth
                        )));
                    }
                    let outer = std::mem::take(&mut self.stack);
                    self.marks.push(outer);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(
                            self.malformed(format!("stack underflow in {}", opcode_name(op)))
                        );
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b'}' => self.push(empty_dict())?,
                0x8f => self.push(Value::Opaque("set"))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.read(4)?.try_into().expect("4 bytes"));
                    self.push(Value::Int(v.into()))?;
                }
                b'K' => {
                    let v = self.read(1)?[0];
                    self.push(Value::Int(v.into()))?;
                }
                b'M' => {
                    let b = self.read(2)?;
                    let v = u16::from_le_bytes([b[0], b[1]]);
                    self.push(Value::Int(v.into()))?;
                }
                b'G' => {
                    self.read(8)?;
                    self.push(Value::Float)?;
                }
                0x8a => {
                    let n = usize::from(self.read(1)?[0]);
                    let bytes = self.read(n)?;
                    let v = decode_long(bytes).map_or(Value::Opaque("int"), Value::Int);
                    self.push(v)?;
                }
                b'X' => {
                    let n = self.read_u32()? as usize;
                    let bytes = self.read(n)?;
                    let s = std::str::from_utf8(bytes)
                        .map_err(|_| self.malformed("BINUNICODE is not UTF-8"))?
                        .to_owned();
                    self.push(Value::Str(s))?;
                }
                b'U' => {
                    let n = usize::from(self.read(1)?[0]);
                    let bytes = self.read(n)?;
                    let v = std::str::from_utf8(bytes)
                        .map_or(Value::Opaque("bytes"), |s| Value::Str(s.to_owned()));
                    self.push(v)?;
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' {
                        self.read(1)?[0].into()
                    } else {
                        self.read_u32()?
                    };
                    let id = *self.memo.get(&idx).ok_or_else(|| {
                        self.malformed(format!("memo entry {idx} was never stored"))
                    })?;
                    self.stack.push(id);
                }
                b'q' | b'r' => {
                    let idx = if op == b'q' {
                        self.read(1)?[0].into()
                    } else {
                        self.read_u32()?
                    };
                    let id = self.top()?;
                    if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&idx) {
                        return Err(self.malformed(format!(
                            "more than {} memo entries",
                            self.limits.max_memo
                        )));
                    }
                    self.memo.insert(idx, id);
                }
                other => {
                    return Err(self.refused(format!(
                        "opcode {} (0x{other:02x}): not allowed by torch.load(weights_only=True)",
                        opcode_name(other)
                    )))
                }
            }
        }
    }

    fn global(&mut self) -> Result<()> {
        let mut module = self.readline()?;
        let name = self.readline()?;
        // Protocol-2 pickles written by Python 2 name the builtins module differently.
        if module == "__builtin__" {
            module = "builtins".into();
        }
        let global = classify(&module, &name).map_err(|why| self.refused(why))?;
        self.push(Value::Global(global, format!("{module}.{name}")))
    }

    fn set_items(&mut self, dict: Id, kv: &[Id]) -> Result<()> {
        self.count_items(kv.len() / 2)?;
        let keys: Vec<Option<Key>> = kv.chunks(2).map(|p| self.key(p[0])).collect();
        if !matches!(self.values[dict], Value::Dict { .. }) {
            let kind = self.values[dict].kind();
            return Err(self.malformed(format!("SETITEM(S) on a {kind}")));
        }
        let Value::Dict { items, index, .. } = &mut self.values[dict] else {
            unreachable!("checked above");
        };
        for (pair, key) in kv.chunks(2).zip(keys) {
            match key.as_ref().and_then(|k| index.get(k).copied()) {
                Some(at) => items[at].1 = pair[1],
                None => {
                    if let Some(k) = key {
                        index.insert(k, items.len());
                    }
                    items.push((pair[0], pair[1]));
                }
            }
        }
        Ok(())
    }

    fn list_mut(&mut self, id: Id, op: &str) -> Result<&mut Vec<Id>> {
        if !matches!(self.values[id], Value::List(_)) {
            let kind = self.values[id].kind();
            return Err(self.malformed(format!("{op} to a {kind}")));
        }
        match &mut self.values[id] {
            Value::List(v) => Ok(v),
            _ => unreachable!("checked above"),
        }
    }

    fn key(&self, id: Id) -> Option<Key> {
        match &self.values[id] {
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Int(i) => Some(Key::Int(*i)),
            _ => None,
        }
    }

    fn reduce(&mut self) -> Result<()> {
        let args = self.pop()?;
        let func = self.top()?;
        let args = self.tuple(args, "REDUCE arguments")?;
        let result = self.call(func, &args, "REDUCE")?;
        let id = self.alloc(result)?;
        *self.stack.last_mut().expect("checked by top()") = id;
        Ok(())
    }

    fn newobj(&mut self) -> Result<()> {
        let args = self.pop()?;
        let cls = self.pop()?;
        let args = self.tuple(args, "NEWOBJ arguments")?;
        let result = match &self.values[cls] {
            Value::Global(Global::Parameter, _) => {
                let mut t = self.tensor_arg(&args, 0)?;
                t.requires_grad = match args.get(1) {
                    Some(&rg) => self.bool_arg(rg)?,
                    None => true,
                };
                Value::Tensor(t)
            }
            Value::Global(Global::Dict, _) if args.is_empty() => empty_dict(),
            Value::Global(_, name) => return Err(self.refused(format!("NEWOBJ on {name}"))),
            other => return Err(self.refused(format!("NEWOBJ on a {}", other.kind()))),
        };
        self.push(result)
    }

    fn build(&mut self) -> Result<()> {
        let state = self.pop()?;
        let inst = self.top()?;
        let state_empty = match &self.values[state] {
            Value::None => true,
            Value::Dict { items, .. } => items.is_empty(),
            Value::Tuple(v) => v.is_empty(),
            _ => false,
        };
        match &self.values[inst] {
            // An OrderedDict's instance attributes, e.g. `state_dict()._metadata`.
            Value::Dict { .. } => {
                let attrs = match &self.values[state] {
                    Value::Dict { items, .. } => items.clone(),
                    _ if state_empty => Vec::new(),
                    other => {
                        return Err(self
                            .malformed(format!("BUILD of a dict with a {} state", other.kind())))
                    }
                };
                if let Value::Dict { attrs: a, .. } = &mut self.values[inst] {
                    a.extend(attrs);
                }
                Ok(())
            }
            Value::Tensor(_) if state_empty => Ok(()),
            other => Err(self.refused(format!("BUILD on a {} with state", other.kind()))),
        }
    }

    fn persistent_id(&mut self) -> Result<()> {
        let pid = self.pop()?;
        let Value::Tuple(fields) = &self.values[pid] else {
            return Err(self.refused(format!(
                "persistent id that is a {}, not a storage tuple",
                self.values[pid].kind()
            )));
        };
        let fields = fields.clone();
        if !matches!(fields.first().map(|&f| &self.values[f]), Some(Value::Str(s)) if s == "storage")
        {
            return Err(self.refused("persistent id other than ('storage', ...)"));
        }
        if fields.len() != 5 {
            return Err(self.malformed(format!(
                "storage persistent id with {} fields, expected 5",
                fields.len()
            )));
        }
        let dtype = match &self.values[fields[1]] {
            Value::Global(Global::Storage(dtype), _) => *dtype,
            other => {
                return Err(self.malformed(format!(
                    "storage type is a {}, not a storage class",
                    other.kind()
                )))
            }
        };
        let key = match &self.values[fields[2]] {
            Value::Str(s) => s.clone(),
            other => return Err(self.malformed(format!("storage key is a {}", other.kind()))),
        };
        match &self.values[fields[3]] {
            Value::Str(location) if is_device_location(location) => {}
            other => {
                // torch.load refuses a location it cannot restore to; so do we, rather than
                // convert a file whose pickle is corrupt.
                let shown = match other {
                    Value::Str(s) => format!("{s:?}"),
                    v => format!("a {}", v.kind()),
                };
                return Err(self.malformed(format!("storage location {shown} is not a device")));
            }
        }
        let numel = self.uint_arg(fields[4], "storage numel")? as u64;
        self.push(Value::Storage(StorageRef { key, dtype, numel }))
    }

    /// The symbolic meaning of calling an allowlisted global.
    fn call(&self, func: Id, args: &[Id], op: &str) -> Result<Value> {
        let (global, name) = match &self.values[func] {
            Value::Global(g, name) => (*g, name),
            other => return Err(self.refused(format!("{op} on a {}", other.kind()))),
        };
        Ok(match global {
            Global::Rebuild(r) => Value::Tensor(self.rebuild(r, args)?),
            Global::Dict if args.is_empty() => empty_dict(),
            Global::Size => match args {
                [t] => Value::Tuple(self.tuple(*t, "torch.Size argument")?),
                _ => return Err(self.malformed("torch.Size takes one tuple")),
            },
            Global::Opaque => Value::Opaque("object"),
            Global::Unsupported(what) => {
                return Err(
                    self.malformed(format!("{name}: {what} cannot be converted to safetensors"))
                )
            }
            _ => return Err(self.refused(format!("{op} on {name}"))),
        })
    }

    fn rebuild(&self, which: Rebuild, args: &[Id]) -> Result<TensorSpec> {
        let (min, max) = match which {
            Rebuild::TensorV1 => (4, 4),
            Rebuild::TensorV2 => (6, 7),
            Rebuild::TensorV3 => (7, 8),
            Rebuild::Parameter => (3, 3),
            Rebuild::ParameterWithState => (4, 4),
            Rebuild::FromType => (4, 4),
        };
        if args.len() < min || args.len() > max {
            return Err(self.malformed(format!("{which:?} called with {} arguments", args.len())));
        }
        match which {
            Rebuild::Parameter | Rebuild::ParameterWithState => {
                let mut t = self.tensor_arg(args, 0)?;
                t.requires_grad = self.bool_arg(args[1])?;
                Ok(t)
            }
            Rebuild::FromType => {
                // `func(*args)`, then `as_subclass(new_type)`; only plain tensor types are accepted.
                match &self.values[args[1]] {
                    Value::Global(Global::TensorClass | Global::Parameter, _) => {}
                    Value::Global(_, name) => {
                        return Err(self.refused(format!("tensor subclass {name}")))
                    }
                    other => {
                        return Err(
                            self.refused(format!("tensor subclass given as a {}", other.kind()))
                        )
                    }
                }
                let inner = self.tuple(args[2], "_rebuild_from_type_v2 arguments")?;
                match self.call(args[0], &inner, "_rebuild_from_type_v2")? {
                    Value::Tensor(t) => Ok(t),
                    other => {
                        Err(self
                            .malformed(format!("_rebuild_from_type_v2 built a {}", other.kind())))
                    }
                }
            }
            Rebuild::TensorV1 | Rebuild::TensorV2 | Rebuild::TensorV3 => {
                let Value::Storage(storage) = &self.values[args[0]] else {
                    return Err(self.malformed(format!(
                        "tensor storage is a {}",
                        self.values[args[0]].kind()
                    )));
                };
                let dtype = if which == Rebuild::TensorV3 {
                    match &self.values[args[6]] {
                        Value::Global(Global::Dtype(t), _) => *t,
                        other => {
                            return Err(
                                self.malformed(format!("tensor dtype is a {}", other.kind()))
                            )
                        }
                    }
                } else {
                    storage
                        .dtype
                        .ok_or_else(|| self.malformed("untyped storage without a dtype argument"))?
                };
                let shape = self.uints(args[2], "size")?;
                let stride = self.uints(args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(self.malformed(format!(
                        "size {shape:?} and stride {stride:?} differ in length"
                    )));
                }
                Ok(TensorSpec {
                    storage_key: storage.key.clone(),
                    storage_dtype: storage.dtype,
                    storage_numel: storage.numel,
                    dtype,
                    storage_offset: self.uint_arg(args[1], "storage offset")?,
                    shape,
                    stride,
                    requires_grad: match which {
                        Rebuild::TensorV1 => false,
                        _ => self.bool_arg(args[4])?,
                    },
                })
            }
        }
    }

    fn tuple(&self, id: Id, what: &str) -> Result<Vec<Id>> {
        match &self.values[id] {
            Value::Tuple(v) => Ok(v.clone()),
            other => {
                Err(self.malformed(format!("{what}: expected a tuple, got a {}", other.kind())))
            }
        }
    }

    fn uints(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        self.tuple(id, what)?
            .into_iter()
            .map(|v| self.uint_arg(v, what))
            .collect()
    }

    fn uint_arg(&self, id: Id, what: &str) -> Result<usize> {
        match &self.values[id] {
            Value::Int(i) => usize::try_from(*i)
                .map_err(|_| self.malformed(format!("{what}: {i} is negative or too large"))),
            other => {
                Err(self.malformed(format!("{what}: expected an int, got a {}", other.kind())))
            }
        }
    }

    fn bool_arg(&self, id: Id) -> Result<bool> {
        match &self.values[id] {
            Value::Bool(b) => Ok(*b),
            other => Err(self.malformed(format!(
                "requires_grad: expected a bool, got a {}",
                other.kind()
            ))),
        }
    }

    fn tensor_arg(&self, args: &[Id], at: usize) -> Result<TensorSpec> {
        match args.get(at).map(|&a| &self.values[a]) {
            Some(Value::Tensor(t)) => Ok(t.clone()),
            Some(other) => Err(self.malformed(format!(
                "parameter data is a {}, not a tensor",
                other.kind()
            ))),
            None => Err(self.malformed("parameter without data")),
        }
    }
}

fn empty_dict() -> Value {
    Value::Dict {
        items: Vec::new(),
        index: HashMap::new(),
        attrs: Vec::new(),
    }
}

/// LONG1's little-endian two's complement, when it fits an i64.
fn decode_long(bytes: &[u8]) -> Option<i64> {
    if bytes.len() > 8 {
        return None;
    }
    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut buf = [fill; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// Names of every pickle opcode, so that a refusal names what it refused.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "<unknown>",
    }
}
