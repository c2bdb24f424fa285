"""Casting: the characters, places, things and plot-specific slots of one story."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xiaolm.data.synth.assets import Bank


def _measure(mw: str, noun: str, desc: str = "") -> str:
    return f"一{mw}{desc}{noun}"


# -------------------------------------------------------------------------------------------------- cast


def _cast(rng: random.Random, bank: "Bank") -> tuple[dict, set, dict]:
    """Characters, places, things and times of one story. Returns (slots, tags, info for the record)."""
    W, R = bank.words, bank.records
    s: dict = {}
    tags: set = set()
    info: dict = {}
    world = "animal" if rng.random() < 0.4 else "human"
    tags.add(world)
    info["world"] = world
    s["t_long"] = rng.choice(W["times_long"])
    s["t_day"] = rng.choice(W["times_day"])
    if world == "human":
        girl = rng.random() < 0.5
        names = W["girls" if girl else "boys"]
        name = rng.choice(names)
        pk = "小女孩" if girl else "小男孩"
        age = rng.choice(W["ages"])
        s.update(p=name, P="她" if girl else "他", pk=pk, age=age)
        quality = rng.choice(["可爱", "活泼", "聪明", "勇敢", "善良", "乖巧", "顽皮", "好奇", "勤劳", "温柔"])
        s["pi"] = rng.choice([f"一个叫{name}的{pk}", f"一个名叫{name}的{pk}", f"一个{quality}的{pk}{name}",
                              f"一个{quality}的{pk}{name}"])
        # "pie" may end with ", named X": only where the introduction ends the sentence
        s["pie"] = s["pi"] if rng.random() < 0.6 else rng.choice([f"一个{age}的{pk}，名字叫{name}",
                                                                   f"一个{quality}的{pk}，名字叫{name}"])
        info["who_en"] = "a little girl" if girl else "a little boy"
        root = ""
        s.update(mom="妈妈", dad="爸爸")
        el, el_p = rng.choice(R["elders"])
        s.update(el=el, EL=el_p, el_call=el)
        sib, sib_p = rng.choice(R["siblings"])
        s["sib"] = sib
        f_girl = rng.random() < 0.5
        f_name = rng.choice([n for n in W["girls" if f_girl else "boys"] if n != name])
        s.update(f=f_name, F="她" if f_girl else "他")
        he = s["P"]
        s["fi"] = rng.choice([f"{he}的好朋友{f_name}", f"邻居家的{f_name}", f"小伙伴{f_name}", f"{he}的同学{f_name}"])
        hi, h, h_p = rng.choice(R["helpers_human"])
        s.update(hi=hi, h=h, H=h_p)
        s["homeplace"] = rng.choice(W["homeplaces_human"])
        places = R["places_human"]
        s["teacher"], s["place_school"] = "老师", "幼儿园"
        info["spots"] = W["spots_human"]
        info["spot_people"] = W["spot_people_human"]
    else:
        species, mw, root, en = rng.choice(R["animals"])
        named = rng.random() < 0.7
        look = rng.choice(W["animal_looks"])
        if named:
            name = rng.choice(W["animal_names"])
            s["pi"] = rng.choice([f"一{mw}叫{name}的{species}", f"一{mw}名叫{name}的{species}"])
            s["pie"] = s["pi"] if rng.random() < 0.5 else f"一{mw}{look}{species}，名字叫{name}"
        else:
            name = species
            s["pi"] = s["pie"] = f"一{mw}{look}{species}"
        s.update(p=name, P="它", pk=species, age="")
        info["who_en"] = f"a {en}"
        s.update(mom=f"{root}妈妈", dad=f"{root}爸爸")
        el_word, el_p = rng.choice(R["elders"][:2])    # 奶奶 / 爷爷
        s.update(el=f"{root}{el_word}", EL=el_p, el_call=el_word)
        sib_word, _ = rng.choice(R["siblings"])
        s["sib"] = f"{root}{sib_word}"
        others = [a for a in R["animals"] if a[2] != root]
        f_species, f_mw, f_root, _ = rng.choice(others)
        if rng.random() < 0.6:
            f_name = rng.choice([n for n in W["animal_names"] if n != name])
            s["fi"] = rng.choice([f"它的好朋友{f_species}{f_name}", f"{f_species}{f_name}",
                                  f"一{f_mw}叫{f_name}的{f_species}"])
        else:
            f_name = f_species
            s["fi"] = rng.choice([f"它的好朋友{f_species}", f"一{f_mw}{f_species}"])
        s.update(f=f_name, F="它")
        hi, h, h_p, h_root = rng.choice([r for r in R["helpers_animal"] if r[3] != root])
        s.update(hi=hi, h=h, H=h_p)
        s["homeplace"] = rng.choice(W["homeplaces_animal"])
        places = R["places_animal"]
        s["teacher"] = "猫头鹰老师"
        s["place_school"] = "森林学校"
        info["spots"] = W["spots_animal"]
        info["spot_people"] = W["spot_people_animal"]
    info["root"] = root
    s.update(mom_call="妈妈", dad_call="爸爸")
    if rng.random() < 0.5:
        s.update(pa=s["mom"], PA="她", pa_call="妈妈")
    else:
        s.update(pa=s["dad"], PA="他", pa_call="爸爸")
    place, loc = rng.choice(places)
    s.update(place=place, placeL=place + loc)
    s["trait"] = rng.choice(W["traits"])
    s["hobby"] = rng.choice(W["hobbies"])
    s["wish"] = rng.choice(W["wishes"])
    obj, mw, size, descs = rng.choice(R["objects"])
    s.update(obj=obj, omw=mw, obj1=_measure(mw, obj), objA=_measure(mw, obj, rng.choice(descs.split())))
    tags.add("small" if size == "s" else "big")
    food, fmw, fdescs = rng.choice(R["foods"])
    s.update(food=food, food1=_measure(fmw, food), foodA=_measure(fmw, food, rng.choice(fdescs.split())))
    info["object"] = obj
    # two characters together: people are 两个人 / 他们, animals 它们俩 / 它们
    if world == "human":
        s.update(both="两个人", they="他们")
    else:
        s.update(both=rng.choice(["它们俩", "两个小伙伴"]), they="它们")
    s["comp"] = s["pa"]     # who goes along (the adventure sets it)
    s["rv"] = s["f"]        # who the conflict is with (set when a conflict line is chosen)
    return s, tags, info


def _fill(text: str, slots: dict) -> str:
    """Expand the slots inside a lexicon phrase ({P}, {mom}, {placeL} ...)."""
    return text.format_map(slots) if "{" in text else text


def _setup_plot(plot: str, rng: random.Random, bank: "Bank", s: dict, tags: set, info: dict) -> dict:
    """Plot-specific slots. Returns the cycles: slot -> values to take in turn (a fresh one per repeat)."""
    W, R = bank.words, bank.records
    cycles: dict[str, list[str]] = {}
    world = info["world"]
    if plot == "lost":
        for slot, values in (("spot", info["spots"]), ("spot_who", info["spot_people"]),
                             ("junk", W["junk"])):
            values = list(values)
            rng.shuffle(values)
            cycles[slot] = values
        info["key_noun"] = s["obj"]
    elif plot == "skill":
        skill, phys, f1, f2, tip, done = rng.choice(R["skills"])
        s.update(skill=skill, sk_fail1=_fill(f1, s), sk_fail2=_fill(f2, s), sk_tip=_fill(tip, s),
                 sk_done=_fill(done, s))
        if phys == "1":
            tags.add("phys")
    elif plot == "share":
        if rng.random() < 0.6:
            rows = R["foods"]
            tags.add("food")
            s.update(eat="吃", try_it="尝一尝", wow="香")
        else:
            rows = [[o, m, d] for o, m, _sz, d in R["objects"]]
            tags.add("toy")
            s.update(eat="玩", try_it="玩一会儿", wow="好玩")
        (name, mw, descs), (name2, mw2, descs2) = rng.sample(rows, 2)
        s.update(sh=name, sh1=_measure(mw, name), shA=_measure(mw, name, rng.choice(descs.split())),
                 sh2A=_measure(mw2, name2, rng.choice(descs2.split())))
        info["key_noun"] = name
    elif plot == "help":
        rows = [r for r in R["troubles"] if r[9] in ("-", world[0]) and r[10] != info["root"]]
        vi, v, vp, sound, prob, vfail, vfix, vafter, vbad, _w, _root = rng.choice(rows)
        s.update(vi=vi, v=v, V=vp, vsound=sound, prob=_fill(prob, s), vfail=_fill(vfail, s), vfix=_fill(vfix, s),
                 vafter=_fill(vafter, s), vbad=_fill(vbad, s))
    elif plot == "gift":
        gift, mw, verb, mat, make, acc, fix = rng.choice(R["gifts"])
        occ, who = rng.choice(R["occasions"])
        if who == "any":
            who = rng.choice(["mom", "dad", "el"])
        rc = {"mom": s["mom"], "dad": s["dad"], "el": s["el"]}[who]
        rc_p = {"mom": "她", "dad": "他", "el": s["EL"]}[who]
        rc_call = {"mom": "妈妈", "dad": "爸爸", "el": s["el_call"]}[who]
        occ_full = f"{rc}的生日" if occ == "生日" else occ
        occ_wish = {"生日": "生日快乐", "新年": "新年快乐"}.get(occ, "节日快乐")
        s.update(occ_wish=occ_wish, gift=gift, gift1=_measure(mw, gift), gverb=verb, gmat=mat, gmake=_fill(make, s), gacc=_fill(acc, s),
                 gfix=_fill(fix, s), rc=rc, RC=rc_p, rc_call=rc_call, occ_full=occ_full,
                 occ_day=f"{occ_full}那天" if occ == "生日" else f"{occ}那天")
        info["key_noun"] = gift
    elif plot == "adventure":
        sight, where, desc, _when = rng.choice(R["sights"])
        s.update(sight=sight, sight_where=where, sight_desc=desc, comp=s["dad"])
        steps = list(bank.lex["journey_steps"])
        rng.shuffle(steps)
        cycles["step"] = steps
        jt, jfix = rng.choice(R["journey_troubles"])
        s.update(jt=jt, jfix=jfix)
        info["key_noun"] = sight
    elif plot == "warning":
        wnot, wdo, wrong, rescue, harm = rng.choice(R["warnings"])
        s.update(wnot=wnot, wdo_short=wnot, wdo=_fill(wdo, s), wwrong=_fill(wrong, s), wrescue=_fill(rescue, s),
                 wharm=_fill(harm, s))
    elif plot == "fear":
        fear, come, show, comfort, real, brave = rng.choice(R["fears"])
        s.update(fear=fear, fcome=_fill(come, s), fshow=_fill(show, s), fcomfort=_fill(comfort, s),
                 freal=_fill(real, s), fbrave=_fill(brave, s))
    elif plot == "plant":
        rows = R["plants"]
        (plant, seed, sprout, grown), other = rng.sample(rows, 2)
        s.update(plant=plant, seed=seed, sprout=_fill(sprout, s), grown=_fill(grown, s), plant2=other[0],
                 seed_ref="小苗" if "苗" in seed else "种子")
        info["key_noun"] = plant
    elif plot == "rain":
        plan, spoil, indoor = rng.choice(R["outings"])
        s.update(plan=plan, spoil=spoil, indoor=indoor)
    elif plot == "contest":
        contest, cdo, close, win = rng.choice(R["contests"])
        s.update(contest=contest, cdo=cdo, close=_fill(close, s), cwin=_fill(win, s))
        if contest == "赛跑":
            tags.add("race")
            s["fast"] = "小兔子" if info["root"] != "兔" else "小鹿"
    elif plot == "cook":
        dish, mw, steps, mistake, taste, hot, eat = rng.choice(R["dishes"])
        s.update(dish=dish, dmw=mw, dsteps=_fill(steps, s), dmistake=_fill(mistake, s), dtaste=_fill(taste, s),
                 deat=eat)
        if hot == "1":
            tags.add("hot")
        info["key_noun"] = dish
    elif plot == "newfriend":
        rows = [r for r in R["newcomers"] if r[5] == world[0]]
        ni, n, np_, diff, talent, _w = rng.choice(rows)
        s.update(ni=ni, n=n, N=np_, ndiff=diff, ntalent=talent)
    return cycles
