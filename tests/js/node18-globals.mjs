// Preloaded (node --import) by tests/test_meeting_client_js.py for its second run: takes away
// the globals Node 18 (Debian bookworm's nodejs) lacks and later versions have, so a newer
// node imitates it. The --no-experimental-global-webcrypto/-customevent flags used before exist
// only in some versions (the run was skipped elsewhere), and whether they took effect was never
// checked; the test probes that this preload did.
delete globalThis.crypto;
delete globalThis.CustomEvent;
