"""Given-name nicknames and spelling variants, and a vocabulary of common given names.

Why this is data in code: duplicate detection (`worker.matching.duplicates`) must treat "Bob" and
"Robert" as one first name, and must *not* treat two different real names that are one
keystroke apart ("Mary"/"Mark", "Emma"/"Ella") as a typo, because families share emails,
phones and addresses. Both lookups must be fast and need no file or network at run time.

All names here are in the form `worker.matching.duplicates` compares: casefolded, accents
stripped, letters and digits only ("Mary-Jo" -> "maryjo").
"""

from __future__ import annotations

from functools import cache

# One line per identity: the formal name, then its nicknames and spelling variants.
# A name may sit on several lines ("chris" for Christopher and Christina); two names
# are related when some line holds both, so "Christopher" and "Christina" are not.
_TABLE = """\
abigail: abby abbie gail
abraham: abe bram
alan: al allan allen alun
albert: al bert bertie
alexander: alex al alec lex sandy xander
alexandra: alex alexa lexi sandy
alfred: al alf alfie fred freddie
alison: allison ali allie ally
amanda: mandy manda
andrew: andy drew
angela: angie
ann: anne annie nan
anthony: tony ant
antonio: tony toni
arthur: art artie
barbara: barb barbie babs
beatrice: bea trixie
benjamin: ben benny benji
bradley: brad
caroline: carolyn carrie carol
cassandra: cassie sandy
catherine: katherine kathryn katharine kate katie kathy cathy kat kit kitty
charles: charlie chuck chas
charlotte: charlie lottie
christina: christine kristina kristine chris tina
christopher: kristopher chris topher kit
cynthia: cindy
daniel: dan danny
danielle: dani
david: dave davy
deborah: debra debbie deb
donald: don donnie
dorothy: dot dottie dolly
douglas: doug
edward: ed eddie ted teddy ned
edwin: ed eddie
elizabeth: liz lizzie lizbeth beth betsy betty eliza libby bess
emily: em emmy millie
ernest: ernie
eugene: gene
evelyn: evie eve
frances: fran frannie
francis: frank fran
franklin: frank
frederick: fred freddie fritz
gabriel: gabe
gerald: gerry jerry
geraldine: gerry geri
gillian: jillian jill
gregory: greg
gwendolyn: gwen
harold: hal harry
henry: hank harry hal
herbert: herb bert
isabella: isabel isabelle bella izzy
jacob: jake
jacqueline: jackie
james: jim jimmy
janet: jan
jeffrey: jeffery geoffrey geoff jeff
jennifer: jen jenny jenn
jeremiah: jeremy jerry
jessica: jess jessie
john: jon jack johnny
jonathan: jon jonny
joseph: joe joey
josephine: jo josie
joshua: josh
judith: judy
kathleen: kathy kate katie
kenneth: ken kenny
kimberly: kimberley kim
lawrence: laurence larry
leonard: len lenny
lillian: lilian lily
louis: lewis lou louie
louise: lou lulu
madeline: madeleine madelyn maddie
margaret: maggie meg peggy marge margie
martha: marty mattie
martin: marty
mary: molly polly mae mamie
matthew: mathew matt matty
maxwell: max
melissa: missy mel lissa
melanie: mel
michael: micheal mike mikey mick mickey
michelle: michele shelly
mitchell: mitch
natalie: nat
nathaniel: nathan nate nat
nicholas: nicolas nick nicky
nicole: nikki nicky
oliver: ollie
olivia: liv ollie
pamela: pam
patricia: pat patty trish tricia
patrick: pat paddy
penelope: penny
peter: pete
philip: phillip phil
raymond: ray
rebecca: rebekah becky becca
richard: rick ricky rich richie dick
robert: bob bobby rob robbie bert
ronald: ron ronnie
russell: russ
samantha: sam sammy
samuel: sam sammy
sarah: sara sally sadie
stanley: stan
stephanie: steph
stephen: steven steve stevie
susan: sue susie suzy
terrence: terence terry
theodore: ted teddy theo
theresa: teresa terry tess tessa
thomas: tom tommy
timothy: tim timmy
tobias: toby
valerie: val
victoria: vicky vickie tori
vincent: vince vinny
virginia: ginny ginger
walter: walt wally
william: bill billy will willie
zachary: zach zack
aaron: aron arron
aidan: aiden ayden
ashley: ashlee ashleigh
brian: bryan brien
caitlin: kaitlyn katelyn kaitlin caitlyn
carl: karl
cheryl: sheryl sherrill
eric: erik erick
isaac: issac
jasmine: jazmin jazmine yasmin
jayden: jaden jaiden
kristen: kristin
lindsay: lindsey
marc: mark
marcus: markus
megan: meghan meagan
nathalie: natalie
sean: shawn shaun
sofia: sophia
tracy: tracey tracie
alberto: beto
alejandro: alex ale
dolores: lola
eduardo: lalo
enrique: quique kike
francisco: paco pancho
guadalupe: lupe lupita
guillermo: memo
ignacio: nacho
jesus: chuy
jose: pepe
roberto: beto
"""

# Common US given names (SSA/Census-derived lists, as shipped in Faker's en_US and
# es_MX person providers). Two *different* names that are both in here are never
# taken for a typo of each other.
_COMMON = """\
    aaron abel abelardo abigail abraham abril adalberto adam adan adela adrian adriana adrienne
    agustin aida aimee alan albert alberto aldo aldonza alec alejandra alejandro alex alexa
    alexander alexandra alexandria alexis alfonso alfred alfredo alice alicia alisha alison allen
    allison alma alonso altagracia alvaro alvin alyssa amador amalia amanda amber amelia amy ana
    anabel analuisa anamaria andre andrea andres andrew anel angel angela angelica angie anita ann
    anna anne annette anthony antonia antonio april araceli arcelia ariadna ariana ariel armando
    arthur arturo ashlee ashley asuncion audrey augusto aurelio aurora austin autumn bailey
    barbara barry beatriz becky belinda benito benjamin bernabe bernard bernardo berta beth
    bethany betty beverly bianca bill billy blake blanca bob bobby bonnie brad bradley brady
    brandi brandon brandy breanna brenda brendan brent brett brian briana brianna bridget brittany
    brittney brooke bruce bruno bryan bryce caitlin caitlyn caleb calvin cameron camila camilo
    candace candice caridad carl carla carlos carlota carly carmen carol carolina caroline carolyn
    carrie casey cassandra cassidy cassie catalina catherine cathy cecilia celia cesar chad
    charlene charles charlotte chase chelsea chelsey cheryl cheyenne chloe chris christian
    christie christina christine christopher christy cindy citlali claire clara clarence claudia
    claudio clayton clemente clifford clinton cody cole colin colleen collin colton concepcion
    conchita connie connor corey cornelio cory courtney craig cristal cristian cristina cristobal
    crystal curtis cynthia daisy dakota dale dalia dalton damon dan dana daniel daniela danielle
    danny darin dario darius darlene darrell darren darryl daryl dave david dawn dean deanna
    debbie debora deborah debra delia denise dennis derek derrick desiree destiny devin devon
    diamond diana diane diego dillon dolores dominic dominique don donald donna doris dorothy
    douglas drew duane dulce dulcemaria dustin dwayne dylan earl ebony eddie edgar eduardo edward
    edwin eileen elaine elena elias elijah elisa elizabeth ellen eloisa eloy elsa elvia elvira
    emilia emiliano emilio emily emma enrique eric erica erik erika erin ernest ernesto esmeralda
    esparta espartaco esperanza esteban estefania estela esther ethan eugene eugenia eugenio eva
    evan evelio evelyn fabiola faith federico felicia felipe felix fernando fidel flavio florencia
    frances francis francisca francisco franciscojavier frank franklin fred frederick frida gabino
    gabriel gabriela gabriella gabrielle gail garrett gary gavin genaro gene geoffrey george
    georgina gerald gerardo german geronimo gilbert gilberto gina glen glenda glenn gloria gonzalo
    gordon grace graciela grant greg gregg gregorio gregory guadalupe guillermina guillermo
    gustavo guy gwendolyn hailey haley hannah harold harry hayden hayley heather hector heidi
    helen helena henry herbert hermelinda hernan hilda holly homero horacio howard hugo humberto
    hunter ian ignacio ilse indira ines irene irma isaac isabel isabela isabella isaiah israel
    itzel ivan ivonne jacinto jack jackie jackson jaclyn jacob jacobo jacqueline jade jaime jake
    james jamie jane janet janice jaqueline jared jasmin jasmine jason javier jay jean jeanette
    jeanne jeff jeffery jeffrey jenna jennifer jenny jeremiah jeremy jermaine jerome jeronimo
    jerry jesse jessica jesus jill jillian jim jimmy jo joan joann joanna joanne joaquin jocelyn
    jodi jody joe joel john johnathan johnny jon jonas jonathan jonathon jordan jorge jorgeluis
    jos jose josecarlos joseeduardo joseemilio josefina joseluis josemanuel josemaria joseph
    joshua joy joyce juan juana juancarlos judith judy julia julian julie julio juliocesar justin
    kaitlin kaitlyn kara karen kari karina karl karla katelyn katherine kathleen kathryn kathy
    katie katrina kayla kaylee keith kelli kellie kelly kelsey kendra kenneth kent kerri kerry
    kevin kiara kim kimberly kirk kirsten krista kristen kristi kristie kristin kristina kristine
    kristopher kristy krystal kurt kyle kylie lacey lance larry latasha latoya laura lauren laurie
    lawrence leah lee leon leonard leonardo leonel leonor leroy leslie leticia levi lilia liliana
    linda lindsay lindsey lisa logan lonnie lorena lorenzo loretta lori lorraine louis lourdes
    lucas lucia luis luisa luismanuel luismiguel luke luz lydia lynn mackenzie madeline madison
    magdalena makayla malik mallory mandy manuel marc marcela marcia marco marcoantonio marcos
    marcus margaret margarita maria mariacristina mariadelcarmen mariaelena mariaeugenia mariah
    mariajose marialuisa mariana mariano mariateresa marie marilyn mario marisa marisela marisol
    marissa mark martha martin marvin mary mason mateo mathew matthew maureen maurice mauricio
    mauro max maximiliano maxwell mayte mckenzie meagan megan meghan melanie melinda melissa
    melody melvin mercedes meredith mia micaela michael michaela micheal michele michelle miguel
    miguelangel mikayla mike mindy minerva miranda miriam misty mitchell mitzy modesto molly
    monica monique morgan nadia nancy natalia natalie natasha nathan nathaniel natividad nayeli
    neil nelly nicholas nichole nicolas nicole nina noah noelia noemi norma norman octavio ofelia
    olga oliver olivia omar oscar oswaldo pablo paige pam pamela paola parker pascual patricia
    patricio patrick patty paul paula paulina pedro peggy penny perla perry peter philip phillip
    phyllis pilar porfirio preston priscilla rachael rachel rafael ralph ramiro ramon randall
    randy raquel raul raven ray raymond rebeca rebecca rebekah regina reginald reina renato rene
    renee reynaldo rhonda ricardo richard rick rickey ricky riley rita robert roberta roberto
    robin robyn rocio rodney rodolfo rodrigo roger rolando ronald ronnie rosa rosalia rosario rose
    ross roy ruben ruby rufino russell ruth ryan sabrina sally salma salvador samantha samuel
    sandra sandy santiago sara sarah savannah scott sean selena serafin sergio sessa seth shane
    shannon shari sharon shaun shawn shawna sheena sheila shelby shelia shelley shelly sheri
    sherri sherry sheryl shirley sierra silvano silvia socorro sofia soledad sonia sonya sophia
    spencer stacey stacie stacy stanley stefanie stephanie stephen steve steven stuart sue summer
    susan susana suzanne sydney sylvia tabitha tamara tami tammie tammy tania tanner tanya tara
    tasha taylor teodoro teresa terrance terrence terri terry theodore theresa thomas tiffany tim
    timoteo timothy tina todd tom tomas tommy toni tony tonya tracey traci tracie tracy travis
    trevor tricia trinidad tristan troy tyler tyrone uriel ursula valerie vanesa vanessa vernon
    veronica vicente vicki vickie victor victoria vincent violeta virginia walter wanda warren
    wayne wendolin wendy wesley whitney wilfrido william willie wyatt xavier yeni yesenia yolanda
    yuridia yvette yvonne zacarias zachary zeferino zoe
"""


def _parse(table: str) -> tuple[frozenset[str], ...]:
    groups = []
    for line in table.splitlines():
        formal, _, rest = line.partition(":")
        groups.append(frozenset([formal.strip(), *rest.split()]))
    return tuple(groups)


GROUPS: tuple[frozenset[str], ...] = _parse(_TABLE)
"""Each set is one identity: a formal name with its nicknames and variants."""

_GROUP_IDS: dict[str, frozenset[int]] = {}
for _gid, _group in enumerate(GROUPS):
    for _name in _group:
        _GROUP_IDS[_name] = _GROUP_IDS.get(_name, frozenset()) | {_gid}
del _gid, _group, _name

KNOWN_GIVEN_NAMES: frozenset[str] = frozenset(_COMMON.split()) | frozenset(_GROUP_IDS)
"""Real given names, for telling a typo ("Mray") from another person ("Mark")."""

PAIR_COUNT: int = sum(len(group) - 1 for group in GROUPS)
"""How many (formal, nickname) pairs the table holds; documentation and tests."""

_EMPTY: frozenset[int] = frozenset()


def are_related(a: str, b: str) -> bool:
    """True when `a` and `b` are different forms of one given name (Bob/Robert, Sara/Sarah)."""
    ga = _GROUP_IDS.get(a)
    return ga is not None and not ga.isdisjoint(_GROUP_IDS.get(b, _EMPTY))


@cache
def alternatives(name: str) -> tuple[str, ...]:
    """Every other form of `name` in the table, sorted; what a data generator may swap in."""
    out: set[str] = set()
    for gid in _GROUP_IDS.get(name, _EMPTY):
        out |= GROUPS[gid]
    out.discard(name)
    return tuple(sorted(out))


def is_known(name: str) -> bool:
    """True for a common given name (or any name in the nickname table)."""
    return name in KNOWN_GIVEN_NAMES


def group_ids(name: str) -> frozenset[int]:
    """Ids of the nickname lines `name` sits on (empty for a name not in the table)."""
    return _GROUP_IDS.get(name, _EMPTY)
