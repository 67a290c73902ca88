/**
 * The file plugin beside nbdkit's: read-only fallback for files that may
 * only be read, TRIM and WRITE_ZEROES as holes and `fallocate`, extents from
 * `SEEK_DATA`/`SEEK_HOLE`, `cache=` and `fadvise=`, block devices; and the
 * same plugin without FFI (Deno `--deny-ffi`, Node without koffi), which
 * must still serve correct bytes. Driven by nbdinfo, nbdsh, nbdcopy and
 * qemu-img; sizes on disk compared with nbdkit's through `stat`.
 *
 * Runs as root (the server is also run as `nobody` with `runuser`; mounts
 * and loop devices are made for the file systems that refuse things).
 *
 * @module
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { chmodSync, cpSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import {
  captive,
  ourCommand,
  requireTool,
  ROOT,
  run,
  RUNTIME,
  scratch,
  sh,
  shQuote,
} from "./helpers.ts";

const MiB = 1024 * 1024;
const ROOT_USER = process.getuid?.() === 0;

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** 512-byte blocks allocated to `path`. */
function blocks(path: string): number {
  const r = sh(`stat -c %b ${shQuote(path)}`);
  assert.equal(r.status, 0, r.stderr);
  return Number(r.stdout);
}

/**
 * The byte ranges of `path` that hold data, as `SEEK_DATA`/`SEEK_HOLE` see
 * them. Two files punched alike have the same ranges, where their `st_blocks`
 * may still differ by an ext4 extent-tree block, depending on how the file
 * system had laid out the data before the holes were punched.
 */
function dataExtents(path: string): string[] {
  const py = [
    "import os, sys",
    "fd = os.open(sys.argv[1], os.O_RDONLY); end = os.fstat(fd).st_size; at = 0",
    "while at < end:",
    "  try: start = os.lseek(fd, at, os.SEEK_DATA)",
    "  except OSError: break",
    "  at = os.lseek(fd, start, os.SEEK_HOLE); print(start, at)",
  ].join("\n");
  return ok(`python3 -c ${shQuote(py)} ${shQuote(path)}`).trim().split("\n").filter(Boolean);
}

/** Bytes of data in `extents` (from {@link dataExtents}). */
function dataBytes(extents: string[]): number {
  return extents.map((e) => e.split(" ").map(Number)).reduce((n, [a, b]) => n + b - a, 0);
}

/** Run a shell script, asserting that it succeeds; its stdout. */
function ok(script: string): string {
  const r = sh(script);
  assert.equal(r.status, 0, `${script}: ${r.stderr}`);
  return r.stdout;
}

/** A sparse file of `size` MiB with 1 MiB of random data at each of `at` (MiB offsets). */
function sparseFile(path: string, size: number, at: number[]): void {
  ok(`truncate -s ${size}M ${shQuote(path)}`);
  for (const m of at) {
    ok(`head -c 1M /dev/urandom | dd of=${shQuote(path)} bs=1M seek=${m} conv=notrunc status=none`);
  }
}

/** The capabilities nbdinfo --json reports, with the meta contexts. */
function flags(json: string): Record<string, unknown> {
  const exp = JSON.parse(json).exports[0];
  const out: Record<string, unknown> = { contexts: exp.contexts };
  for (const [k, v] of Object.entries(exp)) {
    if (k.startsWith("can_") || k.startsWith("is_") || k === "export-size") out[k] = v;
  }
  return out;
}

/** Run nbdkit's file plugin captive (after `prefix`, e.g. `runuser …`). */
function nbdkit(args: string[], script: string, prefix = ""): string {
  return ok(`${prefix} nbdkit -U - file ${args.map(shQuote).join(" ")} --run ${shQuote(script)}`);
}

/** Run ours captive, asserting success; its stdout. */
async function ours(args: string[], script: string, argv = ourCommand()): Promise<string> {
  const [cmd, ...pre] = argv;
  const r = await run([cmd, ...pre, "-U", "-", "file", ...args, "--run", script]);
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

describe("file plugin", () => {
  let dir: string;
  let cleanup: () => void;
  /** Our command line without FFI, or null where the runtime always has it (Bun). */
  let noFfi: string[] | null = null;

  before(() => {
    for (const tool of ["nbdinfo", "nbdsh", "nbdcopy", "qemu-img", "nbdkit"]) requireTool(tool);
    ({ dir, cleanup } = scratch());
    // nobody must reach files in here.
    chmodSync(dir, 0o755);
    if (RUNTIME === "deno") {
      noFfi = [process.execPath, "run", "-A", "--deny-ffi", "--no-check", join(ROOT, "cli.ts")];
    } else if (RUNTIME === "node") {
      // The build copied where no node_modules (so no koffi) is above it.
      const copy = join(dir, "no-koffi");
      cpSync(ROOT, copy, { recursive: true });
      writeFileSync(join(copy, "package.json"), '{ "type": "module" }\n');
      noFfi = [process.execPath, join(copy, "cli.js")];
    }
  });

  after(() => cleanup());

  test("flags and extents of a sparse file match nbdkit's", async () => {
    const path = join(dir, "flags.img");
    sparseFile(path, 16, [3, 9]);
    const mine = flags(await ours([path], 'nbdinfo --json "$uri"'));
    assert.deepEqual(mine, flags(nbdkit([path], 'nbdinfo --json "$uri"')));
    assert.equal(mine.can_fast_zero, false);
    const ourMap = await ours([path], 'nbdinfo --map "$uri"');
    assert.equal(ourMap, nbdkit([path], 'nbdinfo --map "$uri"'));
    assert.match(ourMap, /hole,zero/);
  });

  test("a mode-444 file served to nobody is read-only, as with nbdkit", {
    skip: !ROOT_USER,
  }, async () => {
    const path = join(dir, "ro.img");
    sparseFile(path, 8, [1]);
    chmodSync(path, 0o444);
    const sum = sha256(path);
    const script = 'nbdinfo --json "$uri"; nbdcopy "$uri" - | sha256sum';
    const theirs = nbdkit([path], script, "runuser -u nobody --");
    const mine = await ours([path], script, ["runuser", "-u", "nobody", "--", ...ourCommand()]);
    const json = (s: string) => flags(s.slice(0, s.lastIndexOf("}") + 1));
    assert.deepEqual(json(mine), json(theirs));
    assert.equal(json(mine).is_read_only, true);
    assert.ok(mine.includes(sum), mine);
    // A write is refused with EPERM, the connection carries on.
    const py = "try:\n  h.pwrite(b'x' * 512, 0)\nexcept nbd.Error as e:\n  print(e.errno)\n" +
      "print(len(h.pread(512, 0)))";
    const r = await ours(
      [path],
      `nbdsh -u "$uri" -c ${shQuote(py)}`,
      ["runuser", "-u", "nobody", "--", ...ourCommand()],
    );
    assert.equal(r.trim(), "EPERM\n512");
  });

  test(
    "an immutable file (EPERM for root) is served read-only",
    { skip: !ROOT_USER },
    async () => {
      const path = join(dir, "immutable.img");
      sparseFile(path, 4, [0]);
      ok(`chattr +i ${shQuote(path)}`); // e2fsprogs; the scratch folder is on ext4
      try {
        const mine = flags(await ours([path], 'nbdinfo --json "$uri"'));
        assert.equal(mine.is_read_only, true);
        assert.deepEqual(mine, flags(nbdkit([path], 'nbdinfo --json "$uri"')));
      } finally {
        sh(`chattr -i ${shQuote(path)}`);
      }
    },
  );

  test(
    "a file on a read-only mount (EROFS) is served read-only",
    { skip: !ROOT_USER },
    async () => {
      const src = join(dir, "rw");
      const mnt = join(dir, "romnt");
      ok(`mkdir -p ${src} ${mnt}`);
      sparseFile(join(src, "disk.img"), 4, [1]);
      const mounted = sh(`mount --bind ${src} ${mnt} && mount -o remount,bind,ro ${mnt}`);
      if (mounted.status !== 0) sh(`umount ${mnt}`);
      assert.equal(mounted.status, 0, `a read-only bind mount: ${mounted.stderr}`);
      try {
        const path = join(mnt, "disk.img");
        const out = await ours([path], 'nbdinfo --json "$uri"; nbdcopy "$uri" - | sha256sum');
        assert.equal(flags(out.slice(0, out.lastIndexOf("}") + 1)).is_read_only, true);
        assert.ok(out.includes(sha256(path)));
      } finally {
        sh(`umount ${mnt}`);
      }
    },
  );

  test("small reads of cached, uncached and half-cached pages return the file's bytes", async () => {
    // Small reads are first tried from the page cache (RWF_NOWAIT); what is
    // not cached there is read the usual way. So: a file out of the page
    // cache but for one 4 KiB page, read in 4 KiB blocks twice (uncached,
    // then cached) and in 64 KiB starting at that page (its first page only
    // cached: a short cached read, the rest read after it).
    const path = join(dir, "cache.img");
    ok(`head -c 8M /dev/urandom > ${shQuote(path)} && sync ${shQuote(path)}`);
    ok(
      `python3 -c 'import os; fd = os.open("${path}", os.O_RDONLY); ` +
        `os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)'`,
    );
    ok(`dd if=${shQuote(path)} bs=4k skip=100 count=1 of=/dev/null status=none`);
    assert.equal(ok(`fincore -b -n -o RES ${shQuote(path)}`).trim(), "4096");
    const py = [
      "import hashlib",
      "def blocks(): return b''.join(h.pread(4096, o) for o in range(0, 8 << 20, 4096))",
      "print(hashlib.sha256(h.pread(65536, 100 * 4096)).hexdigest())",
      "print(hashlib.sha256(blocks()).hexdigest())",
      "print(hashlib.sha256(blocks()).hexdigest())",
    ].join("\n");
    const out = (await ours([path], `nbdsh -u "$uri" -c ${shQuote(py)}`)).trim().split("\n");
    const bytes = readFileSync(path);
    const part = createHash("sha256").update(bytes.subarray(100 * 4096, 100 * 4096 + 65536));
    assert.deepEqual(out, [part.digest("hex"), sha256(path), sha256(path)]);
  });

  test("nbdcopy out of a sparse file skips its holes: the copy is as sparse as nbdkit's", async () => {
    const path = join(dir, "sparse64.img");
    sparseFile(path, 64, [0, 20, 63]);
    const mine = join(dir, "copy-ours.img");
    const theirs = join(dir, "copy-theirs.img");
    await ours([path], `nbdcopy "$uri" ${shQuote(mine)}`);
    nbdkit([path], `nbdcopy "$uri" ${shQuote(theirs)}`);
    assert.equal(sha256(mine), sha256(path));
    assert.deepEqual(dataExtents(mine), dataExtents(theirs));
    assert.equal(dataBytes(dataExtents(mine)), 3 * MiB);
  });

  test("nbdcopy and qemu-img into a full file punch its holes, as nbdkit does", async () => {
    const source = join(dir, "source.img");
    sparseFile(source, 32, [2, 30]);
    const sum = sha256(source);
    for (const copy of ['nbdcopy SRC "$uri"', 'qemu-img convert -n -f raw SRC -O raw "$nbd"']) {
      const script = copy.replace("SRC", shQuote(source));
      const mine = join(dir, "target-ours.img");
      const theirs = join(dir, "target-theirs.img");
      ok(`head -c 32M /dev/urandom > ${mine} && cp ${mine} ${theirs}`);
      await ours([mine], script);
      nbdkit([theirs], script);
      assert.equal(sha256(mine), sum, copy);
      assert.deepEqual(dataExtents(mine), dataExtents(theirs), copy);
      assert.equal(dataBytes(dataExtents(mine)), 2 * MiB, copy);
    }
  });

  test("TRIM punches a hole; zeroes punch one or stay allocated (NO_HOLE)", async () => {
    const path = join(dir, "trim.img");
    ok(`head -c 8M /dev/urandom > ${path}`);
    const py = [
      "h.trim(2 * 1048576, 0)",
      "h.zero(2 * 1048576, 2 * 1048576)",
      "h.zero(2 * 1048576, 4 * 1048576, nbd.CMD_FLAG_NO_HOLE)",
      "h.flush()",
      "assert h.pread(6 * 1048576, 0) == bytes(6 * 1048576)",
    ].join("\n");
    await ours([path], `nbdsh -u "$uri" -c ${shQuote(py)}`);
    // 2 MiB of data left, and the 2 MiB zeroed with NO_HOLE still allocated;
    // ext4 may add a 4 KiB block of its extent tree.
    const allocated = blocks(path) * 512;
    assert.ok(allocated >= 4 * MiB && allocated <= 4 * MiB + 4096, `${allocated} bytes allocated`);
    const map = await ours([path], 'nbdinfo --map "$uri"');
    assert.match(map, /^\s+0\s+4194304\s+3\s+hole,zero$/m);
  });

  test("zeroes on file systems that refuse fallocate modes", { skip: !ROOT_USER }, async () => {
    // tmpfs has no ZERO_RANGE (a hole is punched and allocated again); ext2
    // files have no ZERO_RANGE nor allocation (zeroes are written).
    const mnt = join(dir, "mnt");
    ok(`mkdir -p ${mnt}`);
    const ext2 = join(dir, "ext2.img");
    ok(`truncate -s 64M ${ext2} && mkfs.ext2 -q -F ${ext2}`);
    for (
      const mount of [`mount -t tmpfs -o size=32M tmpfs ${mnt}`, `mount -o loop ${ext2} ${mnt}`]
    ) {
      ok(mount);
      try {
        const path = join(mnt, "disk.img");
        ok(`head -c 4M /dev/urandom > ${path}`);
        const py = "h.zero(1048576, 1048576, nbd.CMD_FLAG_NO_HOLE)\n" +
          "h.zero(1048576, 2097152)\nh.trim(1048576, 0)\n" +
          "assert h.pread(3 * 1048576, 0) == bytes(3 * 1048576)";
        await ours([path], `nbdsh -u "$uri" -c ${shQuote(py)}`);
        assert.ok(sh(`cmp -n 3145728 ${path} /dev/zero`).status === 0, mount);
      } finally {
        sh(`umount ${mnt}`);
      }
    }
  });

  test("fallocate's ENOSPC reaches the client as ENOSPC", { skip: !ROOT_USER }, async () => {
    const mnt = join(dir, "tiny");
    ok(`mkdir -p ${mnt}`);
    ok(`mount -t tmpfs -o size=1M tmpfs ${mnt}`);
    try {
      const path = join(mnt, "disk.img");
      ok(`truncate -s 8M ${path}`);
      const py = "try:\n  h.zero(4 * 1048576, 0, nbd.CMD_FLAG_NO_HOLE)\n" +
        "except nbd.Error as e:\n  print(e.errno)";
      const theirs = nbdkit([path], `nbdsh -u "$uri" -c ${shQuote(py)}`);
      const mine = await ours([path], `nbdsh -u "$uri" -c ${shQuote(py)}`);
      assert.equal(mine.trim(), "ENOSPC");
      assert.equal(mine, theirs);
    } finally {
      sh(`umount ${mnt}`);
    }
  });

  test("a loop block device: size, bytes, flags and trim as nbdkit", {
    skip: !ROOT_USER,
  }, async () => {
    const backing = join(dir, "loop.img");
    ok(`head -c 16M /dev/urandom > ${backing}`);
    const dev = ok(`losetup -f --show ${backing}`).trim();
    try {
      const out = join(dir, "loop-out.img");
      const script = `nbdinfo --json "$uri"; nbdcopy "$uri" ${shQuote(out)}`;
      const mine = flags(await ours([dev], script));
      assert.equal(mine["export-size"], 16 * MiB);
      assert.equal(sha256(out), sha256(backing));
      assert.deepEqual(mine, flags(nbdkit([dev], 'nbdinfo --json "$uri"')));
      await ours([dev], `nbdsh -u "$uri" -c 'h.trim(1048576, 0); h.zero(1048576, 1048576)'`);
      assert.equal(sh(`cmp -n 2097152 ${dev} /dev/zero`).status, 0);
    } finally {
      sh(`losetup -d ${dev}`);
    }
  });

  test("cache= and fadvise= are accepted; unknown values stop the server as nbdkit", async () => {
    const path = join(dir, "cache.img");
    ok(`head -c 8M /dev/urandom > ${path}`);
    const copy = join(dir, "cache-out.img");
    for (
      const args of [["cache=none", "fadvise=sequential"], ["cache=default", "fadvise=random"]]
    ) {
      await ours([path, ...args], `nbdcopy "$uri" ${shQuote(copy)} && nbdcopy ${copy} "$uri"`);
      assert.equal(sha256(copy), sha256(path));
    }
    // cache=none drops what was read from the page cache (which cat filled;
    // written back first, since dirty pages cannot be dropped).
    ok(`sync ${path} && cat ${path} > /dev/null`);
    await ours([path, "cache=none"], `nbdcopy "$uri" - > /dev/null`);
    const resident = Number(ok(`fincore -b -n -o RES ${path}`));
    assert.ok(resident < 2 * MiB, `${resident} bytes still in the page cache`);
    const refused = [["cache=foo", "unknown cache mode: foo"], [
      "fadvise=bar",
      "unknown fadvise mode: bar",
    ]];
    for (const [arg, message] of refused) {
      const r = await captive(["file", path, arg], "true");
      assert.equal(r.status, 1);
      assert.equal(r.stderr.trim(), `nbdkit-ts: error: ${message}`);
      const theirs = sh(`nbdkit -U - file ${path} ${arg} --run true`);
      assert.equal(theirs.stderr.trim(), `nbdkit: error: ${message}`);
    }
  });

  test("dir= serves each file of a directory as an export, as nbdkit's does", async () => {
    const d = join(dir, "exports");
    ok(`mkdir ${d} ${d}/sub && mkfifo ${d}/fifo && ln -s nowhere ${d}/broken`);
    ok(`head -c 1M /dev/urandom > ${d}/a.img && ln -s a.img ${d}/link`);
    sparseFile(join(d, "b.img"), 3, [1]);
    const list = (json: string) =>
      (JSON.parse(json).exports as Record<string, unknown>[])
        .map((e) => `${e["export-name"]} ${e["export-size"]} ${e.is_read_only}`).sort();
    const listing = 'nbdinfo --list --json "$uri"';
    const mine = await ours([`dir=${d}`], listing);
    assert.deepEqual(list(mine), [
      "a.img 1048576 false",
      "b.img 3145728 false",
      "link 1048576 false",
    ]);
    assert.deepEqual(list(mine), list(nbdkit([`dir=${d}`], listing)));
    // In name order (nbdkit's is readdir's).
    assert.deepEqual(
      JSON.parse(mine).exports.map((e: Record<string, string>) => e["export-name"]),
      [
        "a.img",
        "b.img",
        "link",
      ],
    );

    // One server: the bytes of each export, a write through the link, a file
    // added while it runs, and refused names that leave it serving.
    const at = (name: string) => `"nbd+unix:///${name}?socket=$unixsocket"`;
    const before = sha256(join(d, "b.img"));
    const py = "h.pwrite(b'\\x5a' * 4096, 8192); h.flush()";
    const refused = ["sub", "fifo", "broken", "sub%2Fa.img", "missing"]
      .map((name) => `nbdinfo ${at(name)} >/dev/null 2>&1 && echo served ${name}`).join("; ");
    const script = `nbdcopy ${at("b.img")} - | sha256sum; ` +
      `nbdsh -u ${at("link")} -c ${shQuote(py)}; ` +
      `head -c 4k /dev/urandom > ${d}/late.img; nbdinfo --list "$uri" | grep -c '^export='; ` +
      `nbdinfo "$uri" >/dev/null 2>&1 && echo served default; ${refused}; ` +
      `nbdcopy ${at("late.img")} - | sha256sum`;
    const [cmd, ...pre] = ourCommand();
    const r = await run([cmd, ...pre, "-U", "-", "file", `dir=${d}`, "--run", script]);
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trim().split("\n");
    assert.equal(lines[0].split(" ")[0], before);
    assert.equal(lines[1], "4");
    assert.equal(lines[2].split(" ")[0], sha256(join(d, "late.img")));
    assert.equal(lines.length, 3, r.stdout);
    const bytes = readFileSync(join(d, "a.img")).subarray(8192, 8192 + 4096);
    assert.ok(bytes.every((b) => b === 0x5a));
    // The default export is refused with a hint; '/' in a name is refused.
    assert.match(r.stderr, /no export name: this server serves the files of .*nbdinfo --list/);
    assert.match(r.stderr, /"sub\/a\.img": export name cannot contain '\/'$/m);
    assert.match(r.stderr, /"sub": open: not a regular file or block device$/m);
    assert.match(r.stderr, /"missing": open: No such file or directory$/m);

    // The directory gone: LIST is refused (NBD_REP_ERR_PLATFORM, as nbdkit),
    // the server carries on and lists it again once it is back.
    const gone = `mv ${d} ${d}.gone; nbdinfo --list "$uri" >/dev/null 2>&1 && echo listed; ` +
      `mv ${d}.gone ${d}; nbdinfo --list "$uri" | grep -c '^export='`;
    const g = await run([cmd, ...pre, "-U", "-", "file", `dir=${d}`, "--run", gone]);
    assert.equal(g.status, 0, g.stderr);
    assert.equal(g.stdout.trim(), "4");
    assert.match(g.stderr, /^nbdkit-ts: file\[\d+\]: error: NBD_OPT_LIST: cannot list exports: /m);

    for (
      const [args, message] of [
        [[`dir=${d}`, join(d, "a.img")], "file= and dir= cannot be used at the same time"],
        [[], "you must supply either [file=]<FILENAME> or dir=<DIRNAME>"],
        [[`dir=${d}/a.img`], `${d}/a.img: is not a directory`],
      ] as const
    ) {
      const c = await captive(["file", ...args], "true");
      assert.equal(c.status, 1);
      assert.equal(c.stderr.trim(), `nbdkit-ts: error: ${message}`);
      assert.equal(sh(`nbdkit -U - file ${args.map(shQuote).join(" ")} --run true`).status, 1);
    }
  });

  test("dir=: the client is not told the server's paths, names cannot forge log lines, -r", async () => {
    const d = join(dir, "private-exports");
    ok(`mkdir ${d} ${d}/sub && head -c 64K /dev/urandom > ${d}/a.img`);
    const before = sha256(join(d, "a.img"));
    const at = (name: string) => `"nbd+unix:///${name}?socket=$unixsocket"`;
    // libnbd's debug output shows the text of the server's error replies.
    const told = (name: string) =>
      `LIBNBD_DEBUG=1 nbdinfo ${at(name)} 2>&1 | grep 'server error message'`;
    const write = "h.pwrite(b'\\xff' * 512, 0)";
    const script = `${told("missing")}; ${told("sub")}; ` +
      `nbdinfo ${at("evil%0Anbdkit-ts:%20forged")} >/dev/null 2>&1; ` +
      `nbdinfo --list --json "$uri" | grep -c '"is_read_only": true'; ` +
      `nbdsh -u ${at("a.img")} -c ${shQuote(write)} 2>/dev/null || echo refused`;
    const [cmd, ...pre] = ourCommand();
    const r = await run([cmd, ...pre, "-r", "-U", "-", "file", `dir=${d}`, "--run", script]);
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trim().split("\n");
    assert.deepEqual(lines.slice(-2), ["1", "refused"], r.stdout);
    const messages = lines.slice(0, -2).map((l) => l.replace(/^.*server error message: /, ""));
    assert.deepEqual([...new Set(messages)], [
      "open: No such file or directory",
      "open: not a regular file or block device",
    ]);
    assert.ok(!r.stdout.includes(dir), r.stdout);
    assert.equal(sha256(join(d, "a.img")), before);
    // The name's newline is written out, on the error's own line.
    assert.doesNotMatch(r.stderr, /^nbdkit-ts: forged/m);
    assert.match(r.stderr, /cannot open export "evil\\x0anbdkit-ts: forged": open: No such/);
  });

  test("a write past the file size limit (EFBIG) reaches the client as ENOSPC, as nbdkit", async () => {
    const path = join(dir, "limited.img");
    ok(`truncate -s 4M ${shQuote(path)}`);
    const py = "try:\n  h.pwrite(b'x' * 4096, 2 << 20)\nexcept nbd.Error as e:\n  print(e.errno)";
    // RLIMIT_FSIZE of 1 MiB, and SIGXFSZ ignored so that the write fails
    // instead. The command goes to sh as arguments: Deno's child_process
    // rewrites a script that names its own executable.
    const limited = (argv: string[]) =>
      run([
        "/bin/sh",
        "-c",
        `ulimit -f 1024; trap '' XFSZ; exec "$@"`,
        "sh",
        ...argv,
        "-U",
        "-",
        "file",
        path,
        "--run",
        `nbdsh -u "$uri" -c ${shQuote(py)}`,
      ]);
    const theirs = await limited(["nbdkit"]);
    assert.equal(theirs.stdout, "ENOSPC\n", theirs.stderr);
    for (const argv of noFfi ? [ourCommand(), noFfi] : [ourCommand()]) {
      const r = await limited(argv);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, "ENOSPC\n", `${argv.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, /NBD_CMD_WRITE: pwrite: .*file too large/i);
    }
  });

  test("a file that shrinks under a client: EIO past its new end, not zeroes, as nbdkit", async () => {
    const path = join(dir, "shrinks.img");
    const py = [
      "import errno, os",
      "data = h.pread(8192, 0)",
      `os.truncate(${JSON.stringify(path)}, 4096)`,
      "for size in (8192, 4096):",
      "  try:",
      "    print(size, h.pread(size, 0) == data[:size])",
      "  except nbd.Error as e:",
      "    print(size, errno.errorcode[e.errnum])",
    ].join("\n");
    const script = `nbdsh -u "$uri" -c ${shQuote(py)}`;
    const expected = "8192 EIO\n4096 True\n";
    ok(`head -c 1M /dev/urandom > ${shQuote(path)}`);
    assert.equal(nbdkit([path], script), expected);
    for (const argv of noFfi ? [ourCommand(), noFfi] : [ourCommand()]) {
      ok(`head -c 1M /dev/urandom > ${shQuote(path)}`);
      const [cmd, ...pre] = argv;
      const r = await run([cmd, ...pre, "-U", "-", "file", path, "--run", script]);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, expected, argv.join(" "));
      assert.match(r.stderr, /file\[1\]: error: NBD_CMD_READ: pread: unexpected end of file$/m);
    }
  });

  test("without FFI: no TRIM, zeroes written, all data, same bytes", async (t) => {
    if (noFfi === null) {
      t.skip(`${RUNTIME} always has FFI`);
      return;
    }
    const path = join(dir, "noffi.img");
    sparseFile(path, 16, [4]);
    const json = flags(await ours([path], 'nbdinfo --json "$uri"', noFfi));
    assert.equal(json.can_trim, false);
    assert.equal(json.can_zero, true);
    assert.equal(json.can_fast_zero, false);
    const map = await ours([path], 'nbdinfo --map "$uri"', noFfi);
    assert.match(map, /^\s+0\s+16777216\s+0\s+data$/m);
    const source = join(dir, "noffi-src.img");
    sparseFile(source, 16, [1]);
    await ours([path, "cache=none", "fadvise=random"], `nbdcopy ${source} "$uri"`, noFfi);
    assert.equal(sha256(path), sha256(source));
    // Zeroes were written as data: the file is fully allocated, unlike with FFI.
    assert.ok(blocks(path) * 512 >= 15 * MiB, `${blocks(path)} blocks`);
  });
});
