#!/usr/bin/env python3
"""The module import graph of src/: every `crate::...`, `super::...` and child-module path
between files. Fails (exit 1) on a loop, or on an import from a higher layer (LAYERS below).
`-v` prints the edges. Run by ci/test.sh."""
import os,re,sys,collections
root=next((a for a in sys.argv[1:] if not a.startswith('-')), os.path.join(os.path.dirname(__file__), '..', 'src'))
# Lowest first. A module may import modules of its own or a lower layer only.
LAYERS = [
    ('base', ['model', 'clock', 'shutdown', 'measure', 'net', 'security', 'capture']),
    ('input', ['config']),
    ('xds', ['xds']),
    ('daemons', ['pilot', 'proxy', 'workload', 'agent']),
    ('harness-client', ['pilot_client', 'launch']),
    ('harness-tools', ['load', 'sim']),
    ('harness-data', ['scenario', 'report', 'gate']),
    ('harness-backends', ['backend']),
    ('harness-drivers', ['churn', 'bench', 'sweep', 'scoping']),
    ('harness-runner', ['run']),
]
# Pairs that must never import each other, whatever the layers say.
FORBIDDEN = [('proxy', 'pilot'), ('pilot', 'proxy'), ('agent', 'pilot'), ('agent', 'proxy'), ('model', None)]
mods={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if f.endswith('.rs'):
            p=os.path.join(dp,f); rel=os.path.relpath(p,root)[:-3]
            if rel in('lib','main'): m=rel
            else: m=rel.replace('/','::')
            mods[m]=p
def resolve(path):
    parts=path.split('::')
    best=None
    for i in range(len(parts),0,-1):
        c='::'.join(parts[:i])
        if c in mods: return c
    return None
edges=collections.defaultdict(set)
for m,p in mods.items():
    full=open(p).read()
    full=re.sub(r'//[^\n]*','',full)
    # `mod tests` at the end: its `super::` is this file, so only its `crate::` paths count.
    cut=full.find('#[cfg(test)]\nmod tests')
    src=full if cut<0 else full[:cut]
    tests='' if cut<0 else full[cut:]
    # expand use crate::{a, b::{c}} roughly
    for mm in re.finditer(r'crate::((?:[a-z_0-9]+::)*)(\{[^;]*?\}|[a-z_0-9]+)',src+tests):
        prefix=mm.group(1); rest=mm.group(2)
        if rest.startswith('{'):
            inner=rest[1:-1]
            for item in re.findall(r'([a-z_0-9]+(?:::[a-z_0-9]+)*)',inner):
                t=resolve((prefix+item).strip(':'))
                if t: edges[m].add(t)
            t=resolve(prefix.strip(':'))
            if t: edges[m].add(t)
        else:
            t=resolve((prefix+rest).strip(':'))
            if t: edges[m].add(t)
    parent='::'.join(m.split('::')[:-1])
    for mm in re.finditer(r'\bsuper::(\{[^;]*?\}|[A-Za-z_0-9]+(?:::[A-Za-z_0-9]+)*|\*)',src):
        g=mm.group(1)
        items=re.findall(r'([A-Za-z_0-9]+(?:::[A-Za-z_0-9]+)*)',g) if g.startswith('{') else [g]
        for item in items:
            cand=(parent+'::'+item).strip(':') if parent else item
            t=resolve(cand) if item!='*' else None
            if t is None or t==m: t=parent if parent else None
            if t: edges[m].add(t)
    for c in mods:
        if c.startswith(m+'::') if m not in ('lib','main') else False:
            child=c[len(m)+2:]
            if '::' in child: continue
            if re.search(r'(?<![:\w])(self::)?'+child+r'::',src): edges[m].add(c)
    edges[m].discard(m)
# children importing parent is normal? count them as edges.
# SCC
idx={};low={};st=[];on=set();sccs=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        sccs.append(comp)
for v in mods:
    if v not in idx: sc(v)
bad=0
for comp in sccs:
    if len(comp)>1:
        print('LOOP:',' <-> '.join(sorted(comp))); bad+=1
def top(m): return m.split('::')[0]
def layer(m):
    for i,(_,mods) in enumerate(LAYERS):
        if top(m) in mods: return i
    return None
for m in sorted(edges):
    for t in sorted(edges[m]):
        lm,lt=layer(m),layer(t)
        if lm is not None and lt is not None and lt>lm:
            print(f'UPWARD: {m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})'); bad+=1
        for a,b in FORBIDDEN:
            if top(m)==a and top(t)!=a and (b is None or top(t)==b):
                print(f'FORBIDDEN: {m} imports {t}'); bad+=1
for m in mods:
    if m not in ('lib','main') and layer(m) is None:
        print(f'UNLAYERED: {m} (add it to LAYERS in ci/modgraph.py)'); bad+=1
if '-v' in sys.argv:
    for m in sorted(edges): print(m,'->',sorted(edges[m]))
print(f'modgraph: {len(mods)} modules, {sum(len(v) for v in edges.values())} edges, {bad} problems')
sys.exit(1 if bad else 0)
