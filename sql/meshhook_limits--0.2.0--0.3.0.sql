-- meshhook_limits 0.2.0 -> 0.3.0: ALTER EXTENSION meshhook_limits UPDATE.
-- Every change to the installed SQL since 0.2.0 (commit bd308bc, kept as
-- sql/released/meshhook_limits--0.2.0.sql), in the order it was made;
-- tests/test_upgrade.py checks that the result equals a fresh install.
\echo Use "ALTER EXTENSION meshhook_limits UPDATE" to load this file. \quit
