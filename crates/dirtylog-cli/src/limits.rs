//! Bounds on the command line's numbers, checked when the arguments are parsed: a time too
//! large to add to a clock (`--accept-timeout-s 18446744073709551615`) or a connection count
//! the engine would refuse is an error at once, before any guest boots.

/// Longest duration any option takes: a week. Every migration and run is bounded; nothing
/// here needs longer, and a week added to any clock reading cannot overflow.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;

fn number(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a whole number"))
}

fn at_most(v: u64, max: u64, unit: &str) -> Result<u64, String> {
    if v > max {
        Err(format!("{v} {unit} is more than a week ({max} {unit})"))
    } else {
        Ok(v)
    }
}

/// Seconds, 0 to a week.
pub fn seconds(s: &str) -> Result<u64, String> {
    at_most(number(s)?, MAX_SECONDS, "s")
}

/// Seconds, 1 to a week.
pub fn seconds_nonzero(s: &str) -> Result<u64, String> {
    match seconds(s)? {
        0 => Err("must be at least 1 s: every migration and run is bounded".into()),
        v => Ok(v),
    }
}

/// Milliseconds, 0 to a week.
pub fn millis(s: &str) -> Result<u64, String> {
    at_most(number(s)?, MAX_SECONDS * 1000, "ms")
}

/// The default number of migration connections: one per CPU core this process may use, at
/// most 4 (each connection is a sending thread and a receiving one).
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4))
}

/// Connections of one migration: 1 to the stream format's limit.
pub fn connections(s: &str) -> Result<usize, String> {
    let max = u64::from(dirtylog_migrate::wire::MAX_CONNECTIONS);
    match number(s)? {
        v @ 1.. if v <= max => Ok(v as usize),
        v => Err(format!("{v} connections: use 1 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!(seconds("0"), Ok(0));
        assert_eq!(seconds("604800"), Ok(MAX_SECONDS));
        assert!(seconds("604801").is_err());
        assert!(seconds("18446744073709551615").is_err());
        assert!(seconds("18446744073709551616").is_err());
        assert!(seconds("-1").is_err());
        assert!(seconds_nonzero("0").is_err());
        assert_eq!(millis("604800000"), Ok(MAX_SECONDS * 1000));
        assert!(millis("604800001").is_err());
        assert_eq!(connections("64"), Ok(64));
        assert!(connections("0").is_err());
        assert!(connections("65").is_err());
        assert!(connections("100000").is_err());
    }
}
