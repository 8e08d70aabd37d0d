#!/usr/bin/env python3
"""tools/cpu_peers_summary.py - medians and per-round ratios of tools/cpu_peers.sh output files.

    tools/cpu_peers_summary.py bench/results/cpu_peers_zen4_after.txt [more files]

For each model, thread count and phase: median tokens/s of run.c, llama.cpp and earn over the rounds, and the median
over rounds of earn / the round's best peer (decode) or earn / llama.cpp (prefill), its range and the rounds won.
"""
import re,sys,statistics as st
for f in sys.argv[1:]:
    rows={}
    for line in open(f):
        m=re.match(r'(\S+) threads=(\d) decode: run.c (\S+) llama.cpp (\S+) earn (\S+)',line)
        if m:
            k=(m[1],m[2],'decode'); a,l,e=float(m[3]),float(m[4]),float(m[5])
            rows.setdefault(k,[]).append((a,l,e,e/max(a,l)))
        m=re.match(r'(\S+) threads=(\d) prefill128: llama.cpp (\S+) earn (\S+)',line)
        if m:
            k=(m[1],m[2],'prefill'); l=float(m[3]); e=m[4]; e=float(e[:-1])*1000 if e.endswith('k') else float(e)
            rows.setdefault(k,[]).append((None,l,e,e/l))
    print(f)
    for k,v in rows.items():
        med=lambda i: st.median([x[i] for x in v]) if v[0][i] is not None else float('nan')
        wins=sum(1 for x in v if x[3]>1)
        print(f"  {k[0]:12s} t={k[1]} {k[2]:8s} run.c {med(0):8.1f} llama.cpp {med(1):8.1f} earn {med(2):8.1f} per-round earn/best {med(3):.3f} (range {min(x[3] for x in v):.3f}-{max(x[3] for x in v):.3f}, {wins} of {len(v)} won)")
