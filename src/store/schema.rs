//! Schema and migrations. `PRAGMA user_version` is the schema version; each migration runs once,
//! in its own transaction, in order.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE boots (
        id          INTEGER PRIMARY KEY,
        boot_id     TEXT NOT NULL UNIQUE,
        first_seen  INTEGER NOT NULL
    );
    CREATE TABLE sessions (
        id            INTEGER PRIMARY KEY,
        alias         TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('open', 'closing', 'closed')),
        remote_state  TEXT NOT NULL CHECK (remote_state IN ('pending', 'open', 'closed', 'closed_remotely')),
        token         TEXT,
        remote_error  TEXT,
        created_at    INTEGER NOT NULL,
        closed_at     INTEGER,
        -- Counters kept by the writer so status stays O(sessions), not O(passings).
        next_num      INTEGER NOT NULL DEFAULT 1,
        delivered     INTEGER NOT NULL DEFAULT 0,
        undeliverable INTEGER NOT NULL DEFAULT 0,
        moved         INTEGER NOT NULL DEFAULT 0     -- passings moved out by `session resend`
    );
    CREATE TABLE reads (
        id            INTEGER PRIMARY KEY,
        received_at   INTEGER NOT NULL,      -- host UTC, µs
        monotonic_us  INTEGER NOT NULL,
        boot          INTEGER NOT NULL REFERENCES boots(id),
        clock_synced  INTEGER NOT NULL,
        chip          TEXT NOT NULL,
        antenna       INTEGER,
        rssi          INTEGER,
        reader_time   INTEGER,               -- reader's time converted to UTC, µs
        timestamp     INTEGER NOT NULL,      -- the time a passing from this read carries, µs
        raw           BLOB NOT NULL,
        replay_key    TEXT,                  -- identifies a read across replays (see reader::format)
        session_id    INTEGER REFERENCES sessions(id)
    );
    CREATE INDEX reads_received ON reads(received_at);
    CREATE UNIQUE INDEX reads_replay ON reads(coalesce(session_id, 0), replay_key) WHERE replay_key IS NOT NULL;
    CREATE TABLE passings (
        id            INTEGER PRIMARY KEY,
        session_id    INTEGER NOT NULL REFERENCES sessions(id),
        num_passing   INTEGER NOT NULL,
        read_id       INTEGER NOT NULL REFERENCES reads(id),
        chip          TEXT NOT NULL,
        bib           TEXT NOT NULL,
        timestamp     INTEGER NOT NULL,      -- UTC µs, as uploaded
        window_start  INTEGER NOT NULL,      -- start of its de-duplication window, µs
        -- 1: the timestamp can be trusted (reader time, a synchronised host clock, or corrected);
        -- 0: host time read before the clock synchronised, held for correction (clock.max_hold);
        -- 2: sent as it was after max_hold, uncorrected.
        clock_synced  INTEGER NOT NULL DEFAULT 1,
        state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'undeliverable')),
        error         TEXT,
        delivered_at  INTEGER,
        resent_from   TEXT,                  -- "session#num" it had before `session resend`
        UNIQUE (session_id, num_passing)
    );
    CREATE INDEX passings_pending ON passings(session_id, num_passing) WHERE state = 'pending';
    -- De-duplication windows still open with dedup_keep = "strongest" (kept across restarts).
    CREATE TABLE windows (
        chip          TEXT PRIMARY KEY,
        session_id    INTEGER NOT NULL REFERENCES sessions(id),
        start_us      INTEGER NOT NULL,
        opened_mono   INTEGER NOT NULL,      -- host monotonic µs when the window opened
        best_read     INTEGER NOT NULL REFERENCES reads(id),
        best_rssi     INTEGER
    );
    "#,
    // 2: a delivery is recorded per batch, not per passing (a per-row UPDATE cost a backlog drain
    // more CPU than the request itself). A passing is delivered when its own state is still
    // 'pending' and its session's `delivered_through` has reached its number ('undeliverable'
    // rows keep their state); rows version 1 marked 'delivered' one by one keep that state and
    // their `delivered_at`. `deliveries` keeps when each range reached the API (export,
    // retention).
    r#"
    ALTER TABLE sessions ADD COLUMN delivered_through INTEGER NOT NULL DEFAULT 0;
    UPDATE sessions SET delivered_through = coalesce(
        (SELECT min(num_passing) FROM passings p WHERE p.session_id = sessions.id AND p.state = 'pending') - 1,
        next_num - 1);
    CREATE TABLE deliveries (
        session_id    INTEGER NOT NULL REFERENCES sessions(id),
        last          INTEGER NOT NULL,
        first         INTEGER NOT NULL,
        at            INTEGER NOT NULL,      -- host UTC µs when the API accepted first..=last
        PRIMARY KEY (session_id, last)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_at ON deliveries(at);
    DROP INDEX passings_pending;
    -- Passings stamped before the clock synchronised, waiting for correction (few, if any).
    CREATE INDEX passings_held ON passings(read_id) WHERE clock_synced = 0;
    -- Rows version 1 marked delivered, for retention (empty in a database created since).
    CREATE INDEX passings_delivered_v1 ON passings(delivered_at) WHERE state = 'delivered';
    "#,
    // 3: test sessions (`session start --test`, a chip check): `remote_state = 'local'`, never
    // sent. A CHECK constraint cannot be altered in place, so the (small) sessions table is
    // rebuilt; foreign keys are off meanwhile and checked before the commit (`migrate_to`).
    r#"
    CREATE TABLE sessions_v3 (
        id                INTEGER PRIMARY KEY,
        alias             TEXT NOT NULL,
        state             TEXT NOT NULL CHECK (state IN ('open', 'closing', 'closed')),
        remote_state      TEXT NOT NULL CHECK (remote_state IN ('pending', 'open', 'closed', 'closed_remotely', 'local')),
        token             TEXT,
        remote_error      TEXT,
        created_at        INTEGER NOT NULL,
        closed_at         INTEGER,
        next_num          INTEGER NOT NULL DEFAULT 1,
        delivered         INTEGER NOT NULL DEFAULT 0,
        undeliverable     INTEGER NOT NULL DEFAULT 0,
        moved             INTEGER NOT NULL DEFAULT 0,
        delivered_through INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO sessions_v3 (id, alias, state, remote_state, token, remote_error, created_at, closed_at,
                             next_num, delivered, undeliverable, moved, delivered_through)
        SELECT id, alias, state, remote_state, token, remote_error, created_at, closed_at,
               next_num, delivered, undeliverable, moved, delivered_through FROM sessions;
    DROP TABLE sessions;
    ALTER TABLE sessions_v3 RENAME TO sessions;
    "#,
    // 4: a replayed read is a repeat of any stored read with its key, in any session; a read
    // older than the windows in memory is checked against the chip's stored passings; a
    // strongest window keeps the bib it was given (the reader's own, from a regex `bib` group);
    // a read says whether it was replayed (so the rewind start point is a live read's time).
    r#"
    CREATE INDEX reads_replay_key ON reads(replay_key) WHERE replay_key IS NOT NULL;
    CREATE INDEX passings_chip ON passings(session_id, chip, window_start);
    ALTER TABLE windows ADD COLUMN bib TEXT;
    ALTER TABLE reads ADD COLUMN replayed INTEGER NOT NULL DEFAULT 0;
    "#,
];

pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Bring the schema up to date. Refuses a database written by a newer version.
pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    migrate_to(conn, VERSION)
}

/// Bring the schema up to `version` (tests build the databases of earlier versions with it).
pub fn migrate_to(conn: &mut Connection, version: i64) -> anyhow::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > VERSION {
        anyhow::bail!(
            "database schema version {current} is newer than this program's {VERSION}; upgrade rufus-gateway"
        );
    }
    if current == 0 {
        // Must precede the first table; lets pruning give pages back to the SD card.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")?;
    }
    if current >= version {
        return Ok(());
    }
    // A table rebuilt by a migration is dropped while others refer to it: foreign keys are
    // enforced again (and checked) once the migrations are done. The pragma is a no-op inside a
    // transaction, so it is set around them.
    let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    let result = (|| -> anyhow::Result<()> {
        for (i, sql) in MIGRATIONS.iter().enumerate().take(version as usize).skip(current as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            let broken: i64 = tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| r.get(0))?;
            if broken > 0 {
                anyhow::bail!("migration {} would leave {broken} rows pointing nowhere; nothing was changed", i + 1);
            }
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
            tx.commit()?;
        }
        Ok(())
    })();
    if enforced {
        conn.execute_batch("PRAGMA foreign_keys = ON")?;
    }
    result
}
