//! A reader for the flat YAML that Marian embeds in its model files.
//!
//! Marian writes its options as one `key: value` line per option, with lists as `- item` lines
//! indented under a key that has no value. Only that subset is read: top-level scalars and lists
//! of scalars. Nested mappings and flow collections (`[a, b]`) other than the empty list `[]`
//! are rejected with the line number, so an option is never silently misread.

/// A value of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YamlValue {
    /// A scalar, with surrounding quotes removed.
    Scalar(String),
    /// A list of scalars.
    List(Vec<String>),
}

impl YamlValue {
    /// Returns the scalar, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            YamlValue::Scalar(s) => Some(s),
            YamlValue::List(_) => None,
        }
    }

    /// Returns the value as an unsigned integer, if it is a scalar that parses as one.
    pub fn as_usize(&self) -> Option<usize> {
        self.as_str()?.parse().ok()
    }

    /// Returns the value as a boolean, if it is the scalar `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self.as_str()? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }
}

/// Parses `text` into its top-level keys and values, in file order.
///
/// # Errors
/// The 1-based line number and the reason when a line is outside the supported subset.
pub fn parse_yaml(text: &str) -> Result<Vec<(String, YamlValue)>, (usize, String)> {
    let mut entries: Vec<(String, YamlValue)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let content = line.trim_end();
        if content.trim_start().is_empty() || content.trim_start().starts_with('#') {
            continue;
        }

        if let Some(item) = content.trim_start().strip_prefix('-') {
            let Some((_, YamlValue::List(items))) = entries.last_mut() else {
                return Err((number, "a list item follows no key without a value".into()));
            };
            items.push(unquote(item.trim()).to_owned());
            continue;
        }
        if content.starts_with(' ') {
            return Err((number, "nested mappings are not supported".into()));
        }

        let Some((key, value)) = content.split_once(':') else {
            return Err((number, format!("expected `key: value`, found {content:?}")));
        };
        let value = value.trim();
        let value = if value.is_empty() || value == "[]" {
            YamlValue::List(Vec::new())
        } else if value.starts_with('[') || value.starts_with('{') {
            return Err((number, format!("flow collection {value:?} is not supported")));
        } else {
            YamlValue::Scalar(unquote(value).to_owned())
        };
        let key = key.trim().to_owned();
        if entries.iter().any(|(k, _)| *k == key) {
            return Err((number, format!("key `{key}` appears twice")));
        }
        entries.push((key, value));
    }
    Ok(entries)
}

fn unquote(value: &str) -> &str {
    let double = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
    let single = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\''));
    double.or(single).unwrap_or(value)
}
