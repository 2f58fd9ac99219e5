//! The JSON files of a checkpoint (config.json, the shard index) read into serde types with
//! errors that name the top-level field at fault; serde_json alone says only "invalid value:
//! integer `-1`, expected usize at line 5 column 24".

use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, Visitor};
use serde_json::Value;

use super::ModelError;

/// Deserialize a JSON object's text into `T`, naming the top-level field whose value is wrong.
pub(crate) fn from_object_text<T: DeserializeOwned>(text: &str) -> Result<T, ModelError> {
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(other) => return Err(ModelError::Json { message: format!("expected a JSON object, found {}", json_kind(&other)) }),
        Err(e) => return Err(ModelError::Json { message: e.to_string() }),
    };
    T::deserialize(Fields(map)).map_err(|e| match e.field {
        Some(field) => ModelError::Config { field, message: e.message },
        None => ModelError::Json { message: e.message },
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    }
}

/// A deserialization error and the top-level field it happened in.
#[derive(Debug)]
struct FieldError {
    field: Option<String>,
    message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

impl serde::de::Error for FieldError {
    fn custom<M: std::fmt::Display>(msg: M) -> Self {
        Self { field: None, message: msg.to_string() }
    }

    fn missing_field(field: &'static str) -> Self {
        Self { field: Some(field.to_owned()), message: "missing".to_owned() }
    }
}

/// A JSON object as a deserializer whose errors say which field failed.
struct Fields(serde_json::Map<String, Value>);

impl<'de> serde::Deserializer<'de> for Fields {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_map(FieldAccess { iter: self.0.into_iter(), value: None })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct FieldAccess {
    iter: serde_json::map::IntoIter,
    value: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for FieldAccess {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, FieldError> {
        let Some((key, value)) = self.iter.next() else { return Ok(None) };
        let k = seed.deserialize(serde::de::value::StrDeserializer::<FieldError>::new(&key))?;
        self.value = Some((key, value));
        Ok(Some(k))
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, FieldError> {
        let (key, value) = self.value.take().ok_or_else(|| serde::de::Error::custom("a value without its key"))?;
        seed.deserialize(value).map_err(|e| FieldError { field: Some(key), message: e.to_string() })
    }
}
