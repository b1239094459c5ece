//! Checksums a layout can check a span against.
//!
//! "CRC-16/CCITT" names at least three different algorithms in vendor manuals, so the
//! layout language refuses the bare name and asks for the variant. Parameters follow the
//! CRC RevEng catalogue (<https://reveng.sourceforge.io/crc-catalogue/16.htm>); `check` is
//! the CRC of the ASCII bytes `123456789`:
//!
//! | name                | poly   | init   | refin/refout | xorout | check  | aka |
//! |---------------------|--------|--------|--------------|--------|--------|-----|
//! | `crc16_modbus`      | 0x8005 | 0xFFFF | true         | 0x0000 | 0x4B37 | |
//! | `crc16_arc`         | 0x8005 | 0x0000 | true         | 0x0000 | 0xBB3D | CRC-16, CRC-IBM |
//! | `crc16_ccitt_false` | 0x1021 | 0xFFFF | false        | 0x0000 | 0x29B1 | CRC-16/IBM-3740, AUTOSAR |
//! | `crc16_xmodem`      | 0x1021 | 0x0000 | false        | 0x0000 | 0x31C3 | ZMODEM, CRC-16/ACORN |
//! | `crc16_kermit`      | 0x1021 | 0x0000 | true         | 0x0000 | 0x2189 | CRC-16/CCITT (true), CCITT-TRUE |
//! | `crc16_x25`         | 0x1021 | 0xFFFF | true         | 0xFFFF | 0x906E | CRC-16/IBM-SDLC, ISO-HDLC |
//! | `crc32`             | 0x04C11DB7 | 0xFFFFFFFF | true | 0xFFFFFFFF | 0xCBF43926 | CRC-32/ISO-HDLC |
//!
//! `sum8` is the byte sum modulo 256 (CJ/T 188 CS), `xor8` the XOR of all bytes (NMEA-style
//! BCC). Tables are built at compile time; computing is one table lookup per byte.

/// A checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sum8,
    Xor8,
    Crc16Modbus,
    Crc16Arc,
    Crc16CcittFalse,
    Crc16Xmodem,
    Crc16Kermit,
    Crc16X25,
    Crc32,
}

/// The names a layout may use, in the order error messages list them.
pub const NAMES: &[&str] = &[
    "sum8",
    "xor8",
    "crc16_modbus",
    "crc16_arc",
    "crc16_ccitt_false",
    "crc16_xmodem",
    "crc16_kermit",
    "crc16_x25",
    "crc32",
];

impl Algorithm {
    /// The algorithm called `name` in a layout, or a sentence saying why not.
    pub fn from_name(name: &str) -> Result<Self, String> {
        Ok(match name {
            "sum8" => Algorithm::Sum8,
            "xor8" => Algorithm::Xor8,
            "crc16_modbus" => Algorithm::Crc16Modbus,
            "crc16_arc" => Algorithm::Crc16Arc,
            "crc16_ccitt_false" => Algorithm::Crc16CcittFalse,
            "crc16_xmodem" => Algorithm::Crc16Xmodem,
            "crc16_kermit" => Algorithm::Crc16Kermit,
            "crc16_x25" => Algorithm::Crc16X25,
            "crc32" => Algorithm::Crc32,
            "crc16_ccitt" | "crc16" | "crc_ccitt" => {
                return Err(format!(
                    "`{name}` is ambiguous: manuals use it for several algorithms; name the \
                     variant: crc16_ccitt_false (init 0xFFFF), crc16_xmodem (init 0), \
                     crc16_kermit (reflected), crc16_x25, crc16_modbus or crc16_arc \
                     (check value of \"123456789\": 0x29B1, 0x31C3, 0x2189, 0x906E, 0x4B37, \
                     0xBB3D)"
                ))
            }
            _ => {
                return Err(format!(
                    "unknown checksum `{name}` (expected one of {})",
                    NAMES.join(", ")
                ))
            }
        })
    }

    /// Width of the checksum value in the frame, in bytes.
    pub fn width(self) -> usize {
        match self {
            Algorithm::Sum8 | Algorithm::Xor8 => 1,
            Algorithm::Crc32 => 4,
            _ => 2,
        }
    }

    /// Whether the value is conventionally sent low byte first: Modbus RTU sends its CRC
    /// that way whatever the register byte order.
    pub fn little_endian_by_convention(self) -> bool {
        matches!(self, Algorithm::Crc16Modbus)
    }

    /// The checksum of `data`.
    pub fn compute(self, data: &[u8]) -> u32 {
        match self {
            Algorithm::Sum8 => u32::from(data.iter().fold(0u8, |a, &b| a.wrapping_add(b))),
            Algorithm::Xor8 => u32::from(data.iter().fold(0u8, |a, &b| a ^ b)),
            Algorithm::Crc16Modbus => {
                u32::from(crc16_reflected(&CRC16_8005_REFLECTED, 0xFFFF, data))
            }
            Algorithm::Crc16Arc => u32::from(crc16_reflected(&CRC16_8005_REFLECTED, 0x0000, data)),
            Algorithm::Crc16CcittFalse => u32::from(crc16_normal(&CRC16_1021, 0xFFFF, data)),
            Algorithm::Crc16Xmodem => u32::from(crc16_normal(&CRC16_1021, 0x0000, data)),
            Algorithm::Crc16Kermit => {
                u32::from(crc16_reflected(&CRC16_1021_REFLECTED, 0x0000, data))
            }
            Algorithm::Crc16X25 => {
                u32::from(crc16_reflected(&CRC16_1021_REFLECTED, 0xFFFF, data) ^ 0xFFFF)
            }
            Algorithm::Crc32 => !data.iter().fold(!0u32, |crc, &b| {
                (crc >> 8) ^ CRC32_REFLECTED[usize::from((crc as u8) ^ b)]
            }),
        }
    }
}

fn crc16_reflected(table: &[u16; 256], init: u16, data: &[u8]) -> u16 {
    data.iter().fold(init, |crc, &b| {
        (crc >> 8) ^ table[usize::from((crc as u8) ^ b)]
    })
}

fn crc16_normal(table: &[u16; 256], init: u16, data: &[u8]) -> u16 {
    data.iter().fold(init, |crc, &b| {
        (crc << 8) ^ table[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

const fn table16_reflected(poly_reversed: u16) -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ poly_reversed
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const fn table16_normal(poly: u16) -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = (i as u16) << 8;
        let mut k = 0;
        while k < 8 {
            c = if c & 0x8000 != 0 {
                (c << 1) ^ poly
            } else {
                c << 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const fn table32_reflected(poly_reversed: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ poly_reversed
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// Poly 0x8005 bit-reversed (0xA001): MODBUS, ARC.
static CRC16_8005_REFLECTED: [u16; 256] = table16_reflected(0xA001);
/// Poly 0x1021: CCITT-FALSE, XMODEM.
static CRC16_1021: [u16; 256] = table16_normal(0x1021);
/// Poly 0x1021 bit-reversed (0x8408): KERMIT, X-25.
static CRC16_1021_REFLECTED: [u16; 256] = table16_reflected(0x8408);
/// Poly 0x04C11DB7 bit-reversed (0xEDB88320): CRC-32.
static CRC32_REFLECTED: [u32; 256] = table32_reflected(0xEDB8_8320);

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: &[u8] = b"123456789";

    #[test]
    fn catalogue_check_values() {
        let cases = [
            ("crc16_modbus", 0x4B37),
            ("crc16_arc", 0xBB3D),
            ("crc16_ccitt_false", 0x29B1),
            ("crc16_xmodem", 0x31C3),
            ("crc16_kermit", 0x2189),
            ("crc16_x25", 0x906E),
            ("crc32", 0xCBF4_3926),
            // 0x31+...+0x39 = 477 = 0x1DD
            ("sum8", 0xDD),
            // 0x31^0x32^...^0x39 = 0x31
            ("xor8", 0x31),
        ];
        for (name, want) in cases {
            let alg = Algorithm::from_name(name).unwrap();
            assert_eq!(alg.compute(CHECK), want, "{name}");
        }
        assert_eq!(NAMES.len(), cases.len());
    }

    #[test]
    fn empty_input_is_the_init_value_after_xorout() {
        assert_eq!(Algorithm::Crc16Modbus.compute(&[]), 0xFFFF);
        assert_eq!(Algorithm::Crc16X25.compute(&[]), 0x0000);
        assert_eq!(Algorithm::Crc32.compute(&[]), 0);
        assert_eq!(Algorithm::Sum8.compute(&[]), 0);
    }

    #[test]
    fn modbus_frame_vector() {
        // Modbus RTU "read holding registers" request 01 03 00 00 00 0A, CRC C5 CD
        // (sent low byte first: 0xCDC5).
        assert_eq!(
            Algorithm::Crc16Modbus.compute(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A]),
            0xCDC5
        );
    }

    #[test]
    fn ambiguous_ccitt_names_the_variants() {
        let e = Algorithm::from_name("crc16_ccitt").unwrap_err();
        assert!(
            e.contains("crc16_ccitt_false") && e.contains("crc16_kermit"),
            "{e}"
        );
        let e = Algorithm::from_name("crc17").unwrap_err();
        assert!(e.starts_with("unknown checksum `crc17`"), "{e}");
    }
}
