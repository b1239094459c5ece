//! The serde form of a layout: what a profile's `[layout]` table deserializes into.
//!
//! Every item is one flat table ([`ItemSpec`]) whose kind is named by its one "head" key
//! (`field`, `const`, `switch`, ...); the compiler (`compile.rs`) decides the kind, refuses keys
//! that do not apply to it, and resolves names, types and expressions. Values a semantic
//! error can point at are [`Spanned`], so errors name the TOML line even when the layout sits
//! inside a larger profile file (spans are byte offsets into that file).
//!
//! This module owns only the shape of the TOML; what the keys mean is in
//! `device-profiles/README-layout.md`.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// A declarative layout: the `[layout]` table of a device profile.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    /// Default byte order of multi-byte numbers: `"big"` (default) or `"little"`.
    pub endian: Option<Spanned<String>>,
    /// What to do with bytes left after the last item: `"error"` (default) or `"ignore"`.
    pub trailing: Option<Spanned<String>>,
    /// The items, in payload order.
    pub items: Spanned<Items>,
}

/// A list of items: a TOML array of inline tables, or (where a single item is enough, as in
/// `cases` and `types`) one inline table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Items {
    pub list: Vec<Spanned<ItemSpec>>,
    /// True when written as one table rather than an array: its span is the enclosing
    /// [`Spanned<Items>`]'s span.
    pub single: bool,
}

/// A number or a string: sizes, counts and offsets are a literal, a name, or an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Int(i64),
    Str(String),
}

/// A TOML table whose keys are data (case codes, enum codes, sentinels), in source order
/// and with the span of every key.
#[derive(Debug, Clone, PartialEq)]
pub struct Entries<V>(pub Vec<(Spanned<String>, V)>);

/// One layout item. Exactly one head key says what it is; the other keys modify it. See
/// `device-profiles/README-layout.md` for the language.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    // Heads.
    pub field: Option<Spanned<String>>,
    pub var: Option<Spanned<String>>,
    pub time: Option<Spanned<String>>,
    #[serde(rename = "const")]
    pub constant: Option<Spanned<String>>,
    pub skip: Option<Spanned<Scalar>>,
    pub skip_while: Option<Spanned<String>>,
    pub mark: Option<Spanned<String>>,
    pub checksum: Option<Spanned<String>>,
    pub bitfield: Option<Spanned<String>>,
    pub switch: Option<Spanned<String>>,
    #[serde(rename = "if")]
    pub cond: Option<Spanned<String>>,
    pub repeat: Option<Spanned<Scalar>>,
    pub tlv: Option<Spanned<String>>,
    pub length: Option<Spanned<Scalar>>,

    // Values.
    #[serde(rename = "type")]
    pub ty: Option<Spanned<String>>,
    pub len: Option<Spanned<Scalar>>,
    pub endian: Option<Spanned<String>>,
    pub at: Option<Spanned<i64>>,
    pub scale: Option<Spanned<f64>>,
    pub offset: Option<Spanned<f64>>,
    pub decimals: Option<Spanned<i64>>,
    #[serde(rename = "enum")]
    pub enumeration: Option<Spanned<Entries<Spanned<String>>>>,
    #[serde(rename = "bool")]
    pub boolean: Option<Spanned<bool>>,
    pub invert: Option<Spanned<bool>>,
    pub sentinel: Option<Spanned<Entries<Spanned<String>>>>,
    pub present: Option<Spanned<String>>,
    pub identity: Option<Spanned<String>>,
    pub bit: Option<Spanned<i64>>,
    pub bits: Option<Spanned<String>>,
    pub zone: Option<Spanned<String>>,

    // Constants and checksums.
    pub name: Option<Spanned<String>>,
    pub from: Option<Spanned<Scalar>>,
    pub to: Option<Spanned<Scalar>>,

    // Groups.
    pub items: Option<Spanned<Items>>,
    pub reading: Option<Spanned<bool>>,
    pub trailing: Option<Spanned<String>>,
    pub interval: Option<Spanned<Scalar>>,
    pub anchor: Option<Spanned<String>>,
    pub cases: Option<Spanned<Entries<Spanned<Items>>>>,
    pub default: Option<Spanned<Items>>,
    pub peek: Option<Spanned<bool>>,
    #[serde(rename = "else")]
    pub otherwise: Option<Spanned<Items>>,
    pub types: Option<Spanned<Entries<Spanned<Items>>>>,
    pub unknown: Option<Spanned<String>>,
}

type Span = std::ops::Range<usize>;

impl ItemSpec {
    /// Every key present in this item with its value's span, in a fixed order (the order of
    /// the struct, which the compiler's messages follow).
    pub(crate) fn present_keys(&self) -> Vec<(&'static str, Span)> {
        let mut out = Vec::new();
        macro_rules! key {
            ($($f:ident => $k:literal),* $(,)?) => {
                $( if let Some(v) = &self.$f { out.push(($k, v.span())); } )*
            };
        }
        key!(
            field => "field", var => "var", time => "time", constant => "const",
            skip => "skip", skip_while => "skip_while", mark => "mark", checksum => "checksum",
            bitfield => "bitfield", switch => "switch", cond => "if", repeat => "repeat",
            tlv => "tlv", length => "length",
            ty => "type", len => "len", endian => "endian", at => "at", scale => "scale",
            offset => "offset", decimals => "decimals", enumeration => "enum",
            boolean => "bool", invert => "invert", sentinel => "sentinel",
            present => "present", identity => "identity", bit => "bit", bits => "bits",
            zone => "zone", name => "name", from => "from", to => "to", items => "items",
            reading => "reading", trailing => "trailing", interval => "interval",
            anchor => "anchor", cases => "cases", default => "default", peek => "peek",
            otherwise => "else", types => "types", unknown => "unknown",
        );
        out
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of items, or one item table")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<ItemSpec>>()? {
                    list.push(item);
                }
                Ok(Items {
                    list,
                    single: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Items, A::Error> {
                let item = ItemSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Items {
                    // The real span is the enclosing `Spanned<Items>`'s (see `single`).
                    list: vec![Spanned::new(0..0, item)],
                    single: true,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Entries<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Spanned<String>>()? {
                    let v = map.next_value::<T>()?;
                    out.push((k, v));
                }
                // The TOML table may come sorted by key; the spans give the source order back.
                out.sort_by_key(|(k, _)| k.span().start);
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_keep_spans_and_order() {
        let src = "items = [\n  { field = \"a\", type = \"u8\" },\n  { switch = \"u8\", cases = { 0x02 = { field = \"b\", type = \"u8\" }, 0x01 = [] } },\n]\n";
        let spec: LayoutSpec = toml::from_str(src).unwrap();
        let items = &spec.items.get_ref().list;
        assert_eq!(items.len(), 2);
        let field = items[0].get_ref().field.as_ref().unwrap();
        assert_eq!(&src[field.span()], "\"a\"");
        let cases = &items[1].get_ref().cases.as_ref().unwrap().get_ref().0;
        assert_eq!(cases[0].0.get_ref(), "0x02");
        assert_eq!(&src[cases[0].0.span()], "0x02");
        assert!(cases[0].1.get_ref().single);
        assert_eq!(cases[1].0.get_ref(), "0x01");
        assert!(cases[1].1.get_ref().list.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_span() {
        let src = "items = [{ field = \"a\", typ = \"u8\" }]";
        let err = toml::from_str::<LayoutSpec>(src).unwrap_err();
        assert!(err.message().contains("unknown field `typ`"), "{err}");
        assert_eq!(&src[err.span().unwrap()], "typ");
    }

    #[test]
    fn scalars_take_ints_and_strings() {
        let spec: LayoutSpec =
            toml::from_str("items = [{ skip = 3 }, { skip = \"n\" }, { scale = 10 }]").unwrap();
        let l = &spec.items.get_ref().list;
        assert_eq!(
            l[0].get_ref().skip.as_ref().unwrap().get_ref(),
            &Scalar::Int(3)
        );
        assert_eq!(
            l[1].get_ref().skip.as_ref().unwrap().get_ref(),
            &Scalar::Str("n".into())
        );
        assert_eq!(*l[2].get_ref().scale.as_ref().unwrap().get_ref(), 10.0);
    }
}
