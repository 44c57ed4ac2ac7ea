#!/usr/bin/env python3
"""S3 listing for the benches, python3 stdlib only: SigV4 header signing (hmac/hashlib), path-style
ListObjectsV2 over one kept-alive HTTP connection.

usage:
  s3sign.py list BUCKET PREFIX           prints "KEY SIZE" per object under PREFIX (all pages)
  s3sign.py gen BUCKET PREFIX            waits (up to 60 s) for a generation under PREFIX/generations/,
                                         prints its name (the newest, names sort by time)
  s3sign.py poll BUCKET GENPREFIX OUT    LISTs GENPREFIX (".../generations/GEN/") back to back,
                                         every INTERVAL_MS (env, default 5) at most, until SIGTERM
Environment: S3_ENDPOINT (http://HOST:PORT), S3_REGION, S3_KEY_ID, S3_SECRET.

poll writes lines in watch.py's format, so lagstats.py reads them: "seg FIRST LAST T_NS NAME" /
"snap TXID T_NS NAME", T_NS = CLOCK_MONOTONIC when the listing that first showed the name
returned (objects present at the first listing are flagged "pre"). Before a segment's line come
"size NAME BYTES" and "listed NAME T0_NS", T0_NS = when that listing was sent. Then "ready" after
the first listing, and on SIGTERM "# poll N INTERVAL_MEAN_MS P50 P99 MAX LIST_P50_MS LIST_P99_MS"
(the achieved time between the starts of consecutive listings, and the time one listing takes).
An object is durable once its PUT returned, and Garage's listings are quorum reads (a name was
always in the first listing sent after its PUT returned), so a segment became durable between
the previous listing's start and T_NS: T_NS is an upper bound, T0_NS a close estimate when
listings are quick (a Garage listing sometimes takes ~40-80 ms on this loopback cluster).
To keep each listing small, it starts after the 8th-newest level-0 segment already seen (names
sort by first txid, and uploads are in txid order, with some slack).
"""
import datetime, hashlib, hmac, http.client, os, signal, sys, time, urllib.parse
import xml.etree.ElementTree as ET
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import SEG_RE, SNAP_RE, pct

NS = '{http://s3.amazonaws.com/doc/2006-03-01/}'
EMPTY_SHA = hashlib.sha256(b'').hexdigest()


def q(s, safe='-_.~'):
    return urllib.parse.quote(s, safe=safe)


class S3:
    def __init__(self):
        ep = urllib.parse.urlsplit(os.environ['S3_ENDPOINT'])
        self.host = ep.netloc
        self.region = os.environ['S3_REGION']
        self.key_id = os.environ['S3_KEY_ID']
        self.secret = os.environ['S3_SECRET']
        self.conn = http.client.HTTPConnection(ep.hostname, ep.port or 80, timeout=30)

    def _auth(self, method, path, query, amz_date):
        day = amz_date[:8]
        cq = '&'.join('%s=%s' % (q(k), q(v)) for k, v in sorted(query.items()))
        headers = 'host:%s\nx-amz-content-sha256:%s\nx-amz-date:%s\n' % (self.host, EMPTY_SHA, amz_date)
        signed = 'host;x-amz-content-sha256;x-amz-date'
        creq = '\n'.join([method, q(path, '/-_.~'), cq, headers, signed, EMPTY_SHA])
        scope = '%s/%s/s3/aws4_request' % (day, self.region)
        sts = '\n'.join(['AWS4-HMAC-SHA256', amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ('AWS4' + self.secret).encode()
        for part in (day, self.region, 's3', 'aws4_request'):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        return 'AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s' % (self.key_id, scope, signed, sig)

    def get(self, path, query):
        amz_date = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
        hdrs = {'Host': self.host, 'x-amz-date': amz_date, 'x-amz-content-sha256': EMPTY_SHA,
                'Authorization': self._auth('GET', path, query, amz_date)}
        url = q(path, '/-_.~') + ('?' + '&'.join('%s=%s' % (q(k), q(v)) for k, v in sorted(query.items())) if query else '')
        for attempt in range(2):
            try:
                self.conn.request('GET', url, headers=hdrs)
                r = self.conn.getresponse()
                body = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()   # the server closed a kept-alive connection: reconnect once
                if attempt:
                    raise
        if r.status != 200:
            raise RuntimeError('GET %s%s: HTTP %d: %s' % (self.host, url, r.status, body[:300].decode(errors='replace')))
        return body

    def list(self, bucket, prefix, delimiter=None, start_after=None):
        """[(key, size)], [common prefixes], following continuation tokens."""
        keys, prefixes, token = [], [], None
        while True:
            query = {'list-type': '2', 'prefix': prefix}
            if delimiter:
                query['delimiter'] = delimiter
            if start_after:
                query['start-after'] = start_after
            if token:
                query['continuation-token'] = token
            root = ET.fromstring(self.get('/' + bucket, query))
            for c in root.iter(NS + 'Contents'):
                keys.append((c.find(NS + 'Key').text, int(c.find(NS + 'Size').text)))
            for c in root.iter(NS + 'CommonPrefixes'):
                prefixes.append(c.find(NS + 'Prefix').text)
            token_el = root.find(NS + 'NextContinuationToken')
            if root.findtext(NS + 'IsTruncated') != 'true' or token_el is None:
                return keys, prefixes
            token = token_el.text


def poll(s3, bucket, prefix, out_path):
    out = open(out_path, 'w', buffering=1)
    interval = float(os.environ.get('INTERVAL_MS', '5')) / 1e3
    starts, durs, seen, level0 = [], [], set(), []

    def done(*_):
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        ms = lambda ns: ns / 1e6
        out.write('# poll %d %.2f %.2f %.2f %.2f %.2f %.2f\n' % (
            len(starts), ms(sum(gaps) / len(gaps)) if gaps else float('nan'),
            ms(pct(gaps, 50)), ms(pct(gaps, 99)), ms(max(gaps)) if gaps else float('nan'),
            ms(pct(durs, 50)), ms(pct(durs, 99))))
        out.flush()
        os._exit(0)
    signal.signal(signal.SIGTERM, done)
    first = True
    while True:
        t0 = time.monotonic_ns()
        starts.append(t0)
        after = prefix + sorted(level0)[-8] if len(level0) >= 8 else None
        keys, _ = s3.list(bucket, prefix, start_after=after)
        t = time.monotonic_ns()
        durs.append(t - t0)
        for key, size in keys:
            name = key[len(prefix):]
            if name in seen:
                continue
            tag = ' pre' if first else ''
            m = SEG_RE.match(name)
            if m:
                seen.add(name)
                out.write('size %s %d\n' % (name, size))
                out.write('listed %s %d\n' % (name, t0))
                if m.group(1) == '0':
                    level0.append(name)
                out.write('seg %d %d %d %s%s\n' % (int(m.group(2), 16), int(m.group(3), 16), t, name, tag))
                continue
            m = SNAP_RE.match(name)
            if m:
                seen.add(name)
                out.write('snap %d %d %s%s\n' % (int(m.group(1), 16), t, name, tag))
        if first:
            out.write('ready\n')
            first = False
        rest = t0 + interval * 1e9 - time.monotonic_ns()
        if rest > 0:
            time.sleep(rest / 1e9)


def main():
    cmd, bucket, prefix = sys.argv[1:4]
    s3 = S3()
    if cmd == 'list':
        keys, _ = s3.list(bucket, prefix)
        for k, size in keys:
            print(k, size)
    elif cmd == 'gen':
        gp = prefix.rstrip('/') + '/generations/' if prefix else 'generations/'
        dl = time.monotonic() + 60
        while time.monotonic() < dl:
            _, gens = s3.list(bucket, gp, delimiter='/')
            if gens:
                print(sorted(gens)[-1][len(gp):].rstrip('/'))
                return
            time.sleep(0.01)
        sys.exit('s3sign: no generation under s3://%s/%s' % (bucket, gp))
    elif cmd == 'poll':
        poll(s3, bucket, prefix, sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == '__main__':
    main()
